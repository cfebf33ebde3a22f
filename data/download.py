"""The real data set, one command away: fetch, check and unpack "Brain Cancer - MRI dataset".

Sources, in order: Mendeley Data (doi:10.17632/mk56jw9rns.1; its API gives each file's size and
sha256, both checked), then its Kaggle mirror through `kagglehub` when Kaggle credentials exist, or an
archive the user downloaded by hand (`--archive`). Every archive is checked before anything lands
where the toolkit reads data: its members stay inside the target folder, its size is bounded, it
holds the three class folders and the expected number of images (6,056). Nothing is written to the
data folder until the unpacked tree has passed, and then in one rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from core.errors import UserError
from data.images import is_dicom, is_image_file
from data.manifest import sha256_file

MENDELEY_ID, MENDELEY_VERSION = "mk56jw9rns", 1
DOI = f"10.17632/{MENDELEY_ID}.{MENDELEY_VERSION}"
MENDELEY_PAGE = f"https://data.mendeley.com/datasets/{MENDELEY_ID}/{MENDELEY_VERSION}"
MENDELEY_API = f"https://data.mendeley.com/public-api/datasets/{MENDELEY_ID}?version={MENDELEY_VERSION}"
KAGGLE_DATASET = "orvile/brain-cancer-mri-dataset"
CLASS_FOLDERS = ("brain_glioma", "brain_menin", "brain_tumor")
EXPECTED_FILES = 6056
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MAX_UNPACKED_BYTES = 20 * 2**30  # the data set is ~0.2 GB; anything near this is not it (or a zip bomb)
USER_AGENT = "brain-cancer-mri-toolkit (download_data.py)"
TIMEOUT_S = 30


class OfflineError(UserError):
    """The source cannot be reached: no network, DNS, proxy or TLS failure."""


@dataclass
class Fetched:
    """An archive or an unpacked folder from one source, with what was checked on the way."""
    source: str
    archive: Path | None = None
    folder: Path | None = None
    sha256: str | None = None
    checks: list[str] = field(default_factory=list)


def manual_steps(dest: Path) -> str:
    return (f"download it by hand on a machine with network access ({MENDELEY_PAGE}, 'Download All'; or "
            f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}), copy the archive here, then: "
            f"python download_data.py --archive PATH (it unpacks to {dest})")


def _open_url(url: str):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise UserError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except OSError as exc:  # URLError, timeouts, refused connections, TLS and DNS failures
        reason = getattr(exc, "reason", exc)
        raise OfflineError(f"cannot reach {url.split('/')[2]} ({reason})") from None


def mendeley_archives(open_url: Callable = _open_url) -> list[dict]:
    """The data set's archive files as Mendeley lists them: filename, size, sha256_hash, download_url."""
    with open_url(MENDELEY_API) as response:
        try:
            document = json.loads(response.read())
        except ValueError:
            raise UserError(f"{MENDELEY_API} did not answer with JSON") from None
    files = document.get("files", []) if isinstance(document, dict) else []
    archives = []
    for f in files:
        details = f.get("content_details") or {}
        if str(f.get("filename", "")).lower().endswith(ARCHIVE_SUFFIXES) and details.get("download_url"):
            archives.append({"filename": f["filename"], "size": details.get("size") or f.get("size"),
                             "sha256": details.get("sha256_hash"), "url": details["download_url"]})
    if not archives:
        raise UserError(f"Mendeley lists no archive for {DOI} (files: "
                        f"{', '.join(str(f.get('filename')) for f in files[:5]) or 'none'})")
    return archives


def download(url: str, target: Path, size: int | None, open_url: Callable = _open_url) -> str:
    """Stream url to target (a .part file renamed at the end); its sha256. Bounded by the announced size."""
    limit = int(size) if size else MAX_UNPACKED_BYTES
    digest, done = hashlib.sha256(), 0
    part = target.with_name(target.name + ".part")
    try:
        with open_url(url) as response, open(part, "wb") as out, \
                tqdm(total=size, unit="B", unit_scale=True, desc=f"Downloading {target.name}") as bar:
            while chunk := response.read(1 << 20):
                done += len(chunk)
                if done > limit:
                    raise UserError(f"{url} sent more than the {limit} bytes announced: download refused")
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    except (OSError, UserError) as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, UserError):
            raise
        raise OfflineError(f"the download of {target.name} broke off after {done} bytes ({exc})") from None
    os.replace(part, target)
    return digest.hexdigest()


def check_checksum(path: Path, actual: str, expected: str | None, checks: list[str], source: str) -> None:
    if not expected:
        checks.append(f"no checksum given by {source} for {path.name}; its sha256 is {actual}")
        return
    if actual.lower() != expected.lower():
        raise UserError(f"{path.name}: sha256 {actual} does not match {expected} given by {source}: the file is "
                        "damaged or not the data set; delete it and download again")
    checks.append(f"sha256 of {path.name} matches the one {source} gives ({actual[:16]}...)")


def fetch_mendeley(work: Path, open_url: Callable = _open_url) -> Fetched:
    fetched = Fetched("Mendeley Data")
    for item in mendeley_archives(open_url):  # the data set is one archive; each is checked the same way
        target = work / Path(item["filename"]).name
        actual = download(item["url"], target, item["size"], open_url)
        if item["size"] and target.stat().st_size != int(item["size"]):
            raise UserError(f"{target.name}: {target.stat().st_size} bytes, Mendeley lists {item['size']}")
        check_checksum(target, actual, item["sha256"], fetched.checks, "Mendeley")
        fetched.archive, fetched.sha256 = target, actual
    return fetched


def kaggle_credentials() -> bool:
    """Whether kagglehub can sign in: KAGGLE_USERNAME + KAGGLE_KEY, or a kaggle.json / access token file."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY") or os.environ.get("KAGGLE_API_TOKEN"):
        return True
    folders = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    folders += [Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]
    return any((f / name).is_file() for f in folders for name in ("kaggle.json", "access_token"))


def fetch_kaggle(dataset: str = KAGGLE_DATASET) -> Fetched:
    """The Kaggle mirror through kagglehub (it downloads and unpacks into its own cache)."""
    try:
        import kagglehub
    except ImportError:
        raise UserError("Kaggle credentials found but kagglehub is not installed: pip install kagglehub") from None
    try:
        folder = Path(kagglehub.dataset_download(dataset))
    except Exception as exc:  # kagglehub raises requests/HTTP errors of its own for network and auth failures
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OfflineError(f"kagglehub could not fetch {dataset} ({text[:200]})") from None
    return Fetched(f"Kaggle ({dataset}, via kagglehub)", folder=folder,
                   checks=["no checksum given by Kaggle: checked by class folders and image count"])


# ---- checking and unpacking ----

def _safe_member(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and not name.startswith(("/", "\\"))


def unpack(archive: Path, into: Path) -> None:
    """Unpack a zip or tar archive into `into`, refusing members that would land outside it, links, and
    archives that unpack to more than MAX_UNPACKED_BYTES."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        try:
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                _check_members([(m.filename, m.file_size) for m in members], archive)
                zf.extractall(into)
        except zipfile.BadZipFile as exc:
            raise UserError(f"{archive} is not a readable zip archive ({exc})") from None
        return
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            _check_members([(m.name, m.size) for m in members], archive)
            if any(m.issym() or m.islnk() or m.isdev() for m in members):
                raise UserError(f"{archive} holds links or device files: refused")
            tf.extractall(into, filter="data")
    except tarfile.TarError as exc:
        raise UserError(f"{archive} is not a readable zip or tar archive ({exc})") from None


def _check_members(members: list[tuple[str, int]], archive: Path) -> None:
    unsafe = [n for n, _ in members if not _safe_member(n)]
    if unsafe:
        raise UserError(f"{archive} has a member that would land outside its folder ({unsafe[0]!r}): refused")
    total = sum(size for _, size in members)
    if total > MAX_UNPACKED_BYTES:
        raise UserError(f"{archive} unpacks to {total / 2**30:.1f} GB, more than the data set could be: refused")


def find_class_root(folder: Path, classes=CLASS_FOLDERS) -> Path:
    """The folder that holds every class folder (the archive may nest it, e.g. 'Brain_Cancer raw MRI data/...')."""
    for dirpath, dirnames, _ in os.walk(folder):
        if set(classes) <= set(dirnames):
            return Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__MACOSX"))]
    raise UserError(f"no folder holding {', '.join(classes)} in what was fetched: not the Brain Cancer MRI data set")


def count_images(class_root: Path, classes=CLASS_FOLDERS) -> dict[str, int]:
    return {c: sum(1 for p in (class_root / c).rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (is_image_file(p) or is_dicom(p))) for c in classes}


def check_tree(class_root: Path, expected_files: int, checks: list[str]) -> dict[str, int]:
    counts = count_images(class_root)
    total = sum(counts.values())
    per_class = ", ".join(f"{c} {n}" for c, n in counts.items())
    if total != expected_files:
        raise UserError(f"expected {expected_files:,} images, found {total:,} ({per_class}): an incomplete "
                        "download or another version of the data set (--expected-files N accepts another count)")
    checks.append(f"class folders {', '.join(CLASS_FOLDERS)} present; {total:,} images ({per_class})")
    return counts


def install(class_root: Path, dest: Path, move: bool) -> None:
    """Put the checked class folders at dest in one rename (copied first when they must stay where they are)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest.parent))
    try:
        target = staging / "tree"
        if move:
            os.replace(class_root, target)
        else:
            shutil.copytree(class_root, target)
        os.replace(target, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Request:
    """What download_data.py was asked: where to, from where, and what to expect."""
    dest: Path
    source: str = "auto"  # auto | mendeley | kaggle
    archive: Path | None = None
    sha256: str | None = None
    expected_files: int = EXPECTED_FILES
    kaggle_dataset: str = KAGGLE_DATASET


def fetch(request: Request, work: Path, log=print, open_url: Callable = _open_url) -> Fetched:
    """From a local archive, else the sources in order; offline everywhere: one line with the manual steps."""
    if request.archive is not None:
        archive = Path(request.archive)
        if not archive.is_file():
            raise UserError(f"archive not found: {archive}")
        fetched = Fetched(f"local archive {archive}", archive=archive, sha256=sha256_file(archive))
        check_checksum(archive, fetched.sha256, request.sha256, fetched.checks, "--sha256")
        return fetched
    failures = []
    if request.source in ("auto", "mendeley"):
        try:
            log(f"Fetching {DOI} from Mendeley Data ({MENDELEY_PAGE})")
            return fetch_mendeley(work, open_url)
        except UserError as exc:
            failures.append(exc)
            if request.source == "mendeley":
                raise _with_manual_steps(exc, request.dest) from None
            log(f"   Mendeley Data: {exc}")
    if request.source == "kaggle" or kaggle_credentials():
        try:
            log(f"Fetching the Kaggle mirror {request.kaggle_dataset} through kagglehub")
            return fetch_kaggle(request.kaggle_dataset)
        except UserError as exc:
            failures.append(exc)
    elif request.source == "auto":
        log("   Kaggle mirror: skipped (no Kaggle credentials: KAGGLE_USERNAME + KAGGLE_KEY or ~/.kaggle/kaggle.json)")
    raise _with_manual_steps(failures[-1], request.dest)


def _with_manual_steps(exc: UserError, dest: Path) -> UserError:
    prefix = "no network: " if isinstance(exc, OfflineError) else ""
    return UserError(f"{prefix}{exc}; {manual_steps(dest)}")


def existing_data(dest: Path, expected_files: int) -> dict[str, int] | None:
    """The class counts when dest already holds the complete data set; None when it is absent or empty.
    Anything else there is refused: the toolkit never overwrites a data folder."""
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return None
    if dest.is_dir() and all((dest / c).is_dir() for c in CLASS_FOLDERS):
        counts = count_images(dest)
        if sum(counts.values()) == expected_files:
            return counts
    raise UserError(f"{dest} already holds something other than the complete data set; move it away (or pass "
                    "--dest to unpack elsewhere): a data folder is never overwritten")


def obtain(request: Request, log=print, open_url: Callable = _open_url) -> dict:
    """Fetch, check and install the data set at request.dest; what was done, for the report."""
    if (counts := existing_data(request.dest, request.expected_files)) is not None:
        return {"source": "already in place", "dest": str(request.dest), "counts": counts, "checks": [],
                "fetched": False}
    request.dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=request.dest.parent))  # same disk: the final move is a rename
    try:
        fetched = fetch(request, work, log, open_url)
        if fetched.archive is not None:
            log(f"Unpacking {fetched.archive.name}")
            unpack(fetched.archive, work / "unpacked")
            class_root, move = find_class_root(work / "unpacked"), True
        else:
            class_root, move = find_class_root(fetched.folder), False
        counts = check_tree(class_root, request.expected_files, fetched.checks)
        install(class_root, request.dest, move)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"source": fetched.source, "dest": str(request.dest), "counts": counts, "checks": fetched.checks,
            "sha256": fetched.sha256, "fetched": True}
