# The SuperExec image that runs Mosaic's ServerApp and ClientApps in the compose demo.
#
# Built from the repository root (compose.yaml sets the context to ../..; the sibling
# superexec.Dockerfile.dockerignore keeps the context to the few files copied below). The app's
# code is not installed here: it arrives with each run in the FAB (flwr run). The image holds its
# dependencies, and the Fashion-MNIST and MNIST files under /app/data.
#
# CPU-only torch (from PyTorch's CPU wheel index: ~200 MB instead of ~2.5 GB of CUDA wheels); the
# demo is for trying the deployment, not for speed. For a GPU image, drop --index-url and run the
# containers with GPU access.
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

# Keep in step with pyproject.toml (tests/test_deployment.py checks it).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

WORKDIR /app

# 1. Dependencies: torch from the CPU index, then the rest of pyproject's [project] dependencies,
#    except flwr itself, which the base image provides at the pinned version (and without Ray).
#    Build files go straight into /tmp (world-writable): the image runs as user app.
COPY --chown=app:app pyproject.toml /tmp/pyproject.toml
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && python -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('flwr')))" > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/pyproject.toml /tmp/requirements.txt

# 2. The datasets, fetched at build time (torchvision's download: the build needs internet).
#    To mount a local copy instead, see the volumes comment in compose.yaml.
COPY --chown=app:app common/ /tmp/common/
RUN cd /tmp && python -m common.fetch_data --root /app/data --dataset all \
    && rm -rf /tmp/common

# Where the ServerApp and ClientApps look when the run config leaves data-root / results-dir
# empty (common/paths.py); the SuperNodes also pass data-root="/app/data" in their node config.
ENV MOSAIC_DATA_ROOT=/app/data \
    MOSAIC_RESULTS_DIR=/app/results \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

ENTRYPOINT ["flower-superexec"]
