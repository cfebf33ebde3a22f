# The serving image: serve.py on port 8000 with ONNX Runtime (no PyTorch: /v1/explain answers 501), a non-root
# user, nothing secret inside. The model comes from the registry at start (MLFLOW_TRACKING_URI: an MLflow server,
# or a store mounted at the path it was written at). docs/scale.md, section "The container image".
#
#   docker build -t brain-mri-serve .
#   docker build --build-arg BASE=registry.hospital.example/debian-python:3.11 -t brain-mri-serve .
#   docker run -p 127.0.0.1:8000:8000 -v mri-audit:/data -e MLFLOW_TRACKING_URI=http://mlflow.hospital:5000 \
#       -v /srv/mri/token:/run/secrets/brain_mri_token:ro brain-mri-serve
#
# BASE: any Debian-like image with python3 (3.10+), its venv module and useradd; container/build_image.sh makes
# one from the Debian mirror (mmdebstrap) where no public image can be pulled, and builds offline from
# container/wheels/ (--build-arg PIP_NO_INDEX=1). REQUIREMENTS=requirements.txt adds PyTorch (Grad-CAM).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG REQUIREMENTS=requirements-serve.txt
# pip reads these from the environment: an offline build sets PIP_NO_INDEX=1, a site mirror PIP_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_INDEX_URL
COPY requirements.txt requirements-serve.txt requirements-train.txt /tmp/build/
COPY container/wheels/ /tmp/build/wheels/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /tmp/build/wheels \
        -r "/tmp/build/${REQUIREMENTS}"
COPY . /app
RUN rm -rf /app/container/wheels && /opt/venv/bin/python -m compileall -q /app

FROM ${BASE}
RUN groupadd --gid 10001 mri \
    && useradd --uid 10001 --gid mri --no-create-home --home-dir /app --shell /usr/sbin/nologin mri \
    && mkdir -p /data /models && chown mri:mri /data && chmod 700 /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp \
    BRAIN_MRI_MODEL=brain-cancer-resnet18 \
    BRAIN_MRI_ALIAS=production \
    BRAIN_MRI_HOST=0.0.0.0 \
    BRAIN_MRI_PORT=8000 \
    BRAIN_MRI_TOKEN_FILE=/run/secrets/brain_mri_token \
    BRAIN_MRI_DATABASE=sqlite:////data/audit.db \
    MLFLOW_TRACKING_URI=sqlite:////models/mlflow.db
WORKDIR /app
USER mri
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/bin/sh", "-c", "python -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:${BRAIN_MRI_PORT}/readyz', timeout=4)\""]
ENTRYPOINT ["/app/container/entrypoint.sh"]
CMD []
