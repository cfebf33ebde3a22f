"""Fetch the real data set, check it and unpack it where the toolkit reads it (the config's dataset.path).

    python download_data.py                              # Mendeley Data, else the Kaggle mirror (kagglehub)
    python download_data.py --archive ~/Downloads/mk56jw9rns-1.zip   # an archive downloaded by hand (air-gapped sites)
    python download_data.py --archive data.zip --sha256 HEX         # ... and its checksum as the source lists it

"Brain Cancer - MRI dataset", Mendeley Data, doi:10.17632/mk56jw9rns.1: 6,056 JPEGs in brain_glioma,
brain_menin, brain_tumor. Exit codes: 0 done (or already in place), 2 a user error or no network (one line,
with the manual steps).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import add_common_args, config_from_args, run
from core.errors import UserError
from data.download import DOI, EXPECTED_FILES, KAGGLE_DATASET, Request, obtain
from data.images import configure_limits


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"Download, check and unpack the Brain Cancer MRI data set (doi:{DOI}) "
                                            "into the config's dataset.path")
    add_common_args(p, model=False)
    p.add_argument("--source", default="auto", choices=("auto", "mendeley", "kaggle"),
                   help="auto: Mendeley Data, then the Kaggle mirror when Kaggle credentials exist (default)")
    p.add_argument("--archive", default=None, metavar="PATH", help="unpack this archive (zip or tar) instead of "
                                                                   "downloading")
    p.add_argument("--sha256", default=None, metavar="HEX", help="with --archive: the checksum it must have")
    p.add_argument("--dest", default=None, metavar="DIR", help="where the class folders go (default: dataset.path)")
    p.add_argument("--expected-files", type=int, default=EXPECTED_FILES, metavar="N",
                   help=f"images the data set must hold (default: {EXPECTED_FILES:,})")
    p.add_argument("--kaggle-dataset", default=KAGGLE_DATASET, metavar="OWNER/NAME",
                   help=f"the Kaggle mirror (default: {KAGGLE_DATASET})")
    return p


def main(args) -> int:
    if args.demo:
        raise UserError("the demo data set is generated on first use, not downloaded: python train.py --model "
                        "resnet18 --demo")
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    dest = Path(args.dest or cfg.dataset.path)
    report = obtain(Request(dest, args.source, Path(args.archive) if args.archive else None, args.sha256,
                            args.expected_files, args.kaggle_dataset))
    counts = ", ".join(f"{c} {n}" for c, n in report["counts"].items())
    if not report["fetched"]:
        print(f"✅ The data set is already in {dest} ({sum(report['counts'].values()):,} images: {counts}); "
              "nothing to do")
    else:
        print(f"✅ Data set from {report['source']} unpacked to {dest}")
        for line in report["checks"]:
            print(f"   checked: {line}")
    where = "" if args.dest is None else f" --set dataset.path='{dest}'"
    print(f"Next: python train.py --model resnet18{where}")
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
