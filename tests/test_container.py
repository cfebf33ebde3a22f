"""The container image, built for real and run: container/build_image.sh (a Debian bookworm base from the package
mirror with mmdebstrap, podman import, podman build --isolation=chroot with no index: pip installs from wheels
fetched beforehand), then the image's file system (podman image mount) run with chroot as the image says (its
user, environment, working folder and entrypoint) on a 127.0.0.1 port; it answers /readyz, its HEALTHCHECK passes,
and it predicts with the registered model mounted at the path it was written at, behind the mounted token.

That test is opt-in (minutes; root, podman and mmdebstrap): BRAIN_MRI_IMAGE_TEST=1 python -m pytest -q -n0
tests/test_container.py. The default suite checks in seconds that the server's modules need none of the packages the
image leaves out.
Measured on a 2-core Intel Xeon shared with other jobs: 4 min 42 s with the Debian base image made (docs/scale.md has
the figures)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from server_process import ROOT, ServerProcess, free_port, write_token

from tests.slowest import slow_setup

opt_in = pytest.mark.skipif(os.environ.get("BRAIN_MRI_IMAGE_TEST") != "1",
                            reason="builds the container image (minutes): BRAIN_MRI_IMAGE_TEST=1 to run it")
# The import names of requirements-train.txt's packages that the image lacks (scikit-learn and matplotlib come
# with MLflow)
NOT_IN_IMAGE = ("torch", "torchvision", "timm", "pytorch_grad_cam", "tensorboard", "wandb", "onnxscript")

MODEL = "brain-cancer-resnet18"
# In a private mount namespace: what a container runtime would give the process, then chroot as the image's user.
# The registry is bound at the path MLflow wrote into it; /tmp and /run are fresh; the token is a mounted file.
NAMESPACE = r"""set -eu
root=$1 registry=$2 copy=$3 data=$4 token=$5 user=$6
shift 6
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mkdir -p "$root$registry"
mount --bind "$copy" "$root$registry"
mount --bind "$data" "$root/data"
mount -t tmpfs -o mode=755 tmpfs "$root/run"
mkdir "$root/run/secrets"
install -m 0400 -o "${user%:*}" "$token" "$root/run/secrets/brain_mri_token"
exec chroot --userspec="$user" "$root" "$@"
"""


def test_the_server_starts_without_pytorch_as_in_the_image():
    """Every module serve.py loads (API, review page, DICOM receiver, ONNX predictor) imports with the packages the
    image leaves out made unimportable: a top-level `import torch` on that path would break the image."""
    code = (f"import sys\nBLOCKED = {set(NOT_IN_IMAGE)!r}\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import serve, serving.app, serving.runner, review.extension, pacs.extension\n"
            "from deploy.predictors import OnnxPredictor\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


@pytest.fixture(scope="module")
@slow_setup("builds a Debian base with mmdebstrap and the toolkit's image on it with podman")
def image(tmp_path_factory):
    """The image's tag, its configuration (podman image inspect) and its file system mounted read-only. Built from
    a copy of what git tracks, as CI builds, so the wheels build_image.sh fetches land in the copy, not the checkout."""
    if os.geteuid() != 0 or not (shutil.which("podman") and shutil.which("mmdebstrap")):
        pytest.skip("needs root, podman and mmdebstrap (Debian: apt-get install podman mmdebstrap)")
    tree = tmp_path_factory.mktemp("image context") / "brain-cancer-mri"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    tag = f"localhost/brain-mri-serve:test-{uuid.uuid4().hex[:8]}"
    build = subprocess.run([str(tree / "container" / "build_image.sh"), tag], env={**os.environ,
                           "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        [config] = json.loads(subprocess.run(["podman", "image", "inspect", tag], check=True, capture_output=True,
                                             text=True).stdout)
        rootfs = Path(subprocess.run(["podman", "image", "mount", tag], check=True, capture_output=True,
                                     text=True).stdout.strip())
        try:
            yield tag, config, rootfs
        finally:
            subprocess.run(["podman", "image", "umount", tag], capture_output=True)
    finally:
        subprocess.run(["podman", "rmi", "--force", tag], capture_output=True)


def image_user(config: dict, rootfs: Path) -> tuple[int, int]:
    """The uid and gid of the image's USER, from its own /etc/passwd."""
    for line in (rootfs / "etc" / "passwd").read_text().splitlines():
        name, _, uid, gid, *_ = line.split(":")
        if name == config["Config"]["User"]:
            return int(uid), int(gid)
    raise AssertionError(f"user {config['Config']['User']!r} not in the image")


def image_env(config: dict, **overrides: str) -> list[str]:
    env = dict(item.split("=", 1) for item in config["Config"]["Env"]) | overrides
    return [f"{k}={v}" for k, v in env.items()]


class ImageServer(ServerProcess):
    """The image's entrypoint under chroot in a private mount namespace, on a free 127.0.0.1 port."""

    def __init__(self, config: dict, rootfs: Path, registry: Path, workdir: Path, token: str):
        uid, gid = image_user(config, rootfs)
        self.port, self.workdir, self.token = free_port(), Path(workdir), token
        copy, data = self.workdir / "registry", self.workdir / "data"
        shutil.copytree(registry, copy)  # the image's user owns its copy (MLflow's sqlite wants to write)
        data.mkdir(mode=0o700)
        for path in [data, *copy.rglob("*"), copy]:
            os.chown(path, uid, gid)
        token_file, _ = write_token(self.workdir, token)
        env = image_env(config, BRAIN_MRI_HOST="127.0.0.1", BRAIN_MRI_PORT=str(self.port), BRAIN_MRI_ALIAS="staging",
                        MLFLOW_TRACKING_URI=f"sqlite:///{registry / 'registry.db'}")
        command = [*config["Config"]["Entrypoint"], *(config["Config"].get("Cmd") or []), "--poll-seconds", "0"]
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE, "sh", str(rootfs),
                str(registry), str(copy), str(data), str(token_file), f"{uid}:{gid}",
                "/usr/bin/env", "-i", f"--chdir={config['Config']['WorkingDir']}", *env, *command]
        self.start(argv, {"PATH": os.environ["PATH"]})
        self.data = data


@opt_in
def test_the_image_builds_offline_runs_as_its_user_and_answers(image, registered, tiny_data, tmp_path):
    tag, config, rootfs = image
    registry = Path(next(a for a in map(str, registered) if a.startswith("monitoring.mlflow.tracking_uri="))
                    .split("sqlite:///", 1)[1]).parent
    if not str(registry).startswith("/tmp/"):
        pytest.skip(f"the registry must lie under /tmp to be bound at its own path in the image: {registry}")
    assert config["Config"]["User"] not in ("", "root", "0") and not (rootfs / "run" / "secrets").exists()
    assert not list((rootfs / "app").glob("**/*.whl")) and not (rootfs / "opt" / "venv" / "bin" / "torch").exists()
    srv = ImageServer(config, rootfs, registry, tmp_path, token="image-token-0123456789abcdef")
    try:
        srv.wait_ready(300)
        status = (Path("/proc") / str(srv.proc.pid) / "status").read_text()
        assert f"Uid:\t{image_user(config, rootfs)[0]}\t" in status  # not root inside
        health = config["Healthcheck"]["Test"]
        assert health[0] == "CMD"
        checked = subprocess.run(["chroot", f"--userspec={':'.join(map(str, image_user(config, rootfs)))}",
                                  str(rootfs), "/usr/bin/env", "-i", *image_env(config, BRAIN_MRI_PORT=str(srv.port)),
                                  *health[1:]], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stderr
        jpeg = sorted(tiny_data.rglob("*.jpg"))[0].read_bytes()
        assert httpx.post(f"{srv.url}/v1/predict", files={"files": ("slice.jpg", jpeg)}).status_code == 401
        with srv.client() as c:
            r = c.post("/v1/predict", files={"files": ("slice.jpg", jpeg)})
            assert r.status_code == 200, r.text
            doc = r.json()
            assert (doc["model"], doc["version"], doc["flavor"]) == (MODEL, "1", "onnx")
            [p] = doc["predictions"]
            classes = c.get("/v1/model").json()["contract"]["class_names"]  # the answer names the version
            assert p["predicted_class"] in classes and p["record_id"]
            explain = c.post("/v1/explain", files={"files": ("slice.jpg", jpeg)})
            assert explain.status_code == 501 and "PyTorch" in explain.text  # an ONNX-only image says why
    finally:
        srv.stop()
    assert (srv.data / "audit.db").stat().st_uid == image_user(config, rootfs)[0]  # the record, on the volume
