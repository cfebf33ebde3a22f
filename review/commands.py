"""The review station's subcommands of serve.py: add-reviewer and export-reviews."""
from __future__ import annotations

import argparse

from core.cli import RefuseSecret, add_common_args, config_from_args
from review.auth import add_reviewer, read_password
from review.cases import CaseFiles
from review.export import FINDINGS_DIR, GROUP_PATTERN, export_reviews
from review.schema import MIGRATIONS
from serving.audit import make_engine, migrate


def _database_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, model=False)
    p.add_argument("--database", default=None, metavar="URL",
                   help="the server's audit database (default: serving.database_url, sqlite:///audit.db)")


def _engine(args):
    cfg = config_from_args(args, **{"serving.database_url": args.database})
    engine = make_engine(cfg.serving.database_url, cfg.serving.audit_fsync)
    migrate(engine, MIGRATIONS)
    return cfg, engine


def add_reviewer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py add-reviewer",
                                description="Add a reviewer who may log in to the review page (serve.py --review)")
    p.add_argument("name", help="the reviewer's login name (letters, digits, . _ -)")
    p.add_argument("--password-file", default=None, metavar="FILE",
                   help="a file holding the password (at least 10 characters); without it the password is typed "
                        "at the terminal. Never on the command line")
    p.add_argument("--password", action=RefuseSecret, instead="use --password-file FILE (chmod 600) or type it")
    p.add_argument("--reset", action="store_true", help="set a new password for an existing reviewer")
    _database_args(p)
    return p


def add_reviewer_main(args) -> int:
    password = read_password(args.password_file)
    _, engine = _engine(args)
    try:
        new = add_reviewer(engine, args.name, password, replace=args.reset)
    finally:
        engine.dispose()
    print(f"👤 Reviewer {args.name} {'added' if new else 'has a new password'} "
          f"({engine.url.render_as_string(hide_password=True)})")
    return 0


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py export-reviews",
                                description="Write the reviewed cases as an ImageFolder tree of the reviewers' classes "
                                            "plus verdicts.csv, for train.py --set dataset.path=OUT_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) folder")
    p.add_argument("--store-dir", default=None, metavar="DIR",
                   help="where the server kept the uploads (default: review.store_dir)")
    p.add_argument("--flagged-only", action="store_true",
                   help="only the slices the reviewer flagged with the verdict (default: every slice judged)")
    _database_args(p)
    return p


def export_main(args) -> int:
    cfg, engine = _engine(args)
    try:
        done = export_reviews(engine, CaseFiles(args.store_dir or cfg.review.store_dir), args.out_dir,
                              args.flagged_only)
    finally:
        engine.dispose()
    per_class = ", ".join(f"{c} {n}" for c, n in sorted(done.files.items())) or "none"
    print(f"📦 {sum(done.files.values())} reviewed images in {done.out_dir} ({per_class}); "
          f"{done.verdicts} verdicts in {done.out_dir / 'verdicts.csv'}")
    if done.findings:
        said = ", ".join(f"{f} {n}" for f, n in sorted(done.findings.items()))
        print(f"🗂️  {sum(done.findings.values())} images whose verdict is no class ({said}) in "
              f"{done.out_dir / FINDINGS_DIR} (train.py skips it)")
    if done.missing:
        print(f"⚠️  {len(done.missing)} reviewed case(s) without their kept file (removed from the store?): "
              f"{', '.join(done.missing[:5])}{' ...' if len(done.missing) > 5 else ''}")
    print(f"🔮 Next: python train.py --model resnet18 --set dataset.path={done.out_dir} "
          f"--set dataset.group_pattern='{GROUP_PATTERN}'")
    return 0
