# Two images from one file (docker-compose.yml builds both):
#   controller (default target): the live loop's runtime — controller, replay, topic admin — no torch;
#   train: the controller image plus training and export (torch, CPU build).
FROM python:3.11-slim AS controller

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DTWIN_MODEL_DIR=/models/current \
    DTWIN_METRICS_PORT=9108 \
    DTWIN_WEB_PORT=6066

WORKDIR /src

# Dependency layer for a given extra, read from pyproject.toml, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import subprocess, sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = p['dependencies'] + p['optional-dependencies']['controller']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])"

COPY . ./
RUN pip install --no-deps . \
    && dtwin --help > /dev/null \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

RUN useradd --create-home --uid 10001 dtwin \
    && mkdir -p /models /data \
    && chown dtwin:dtwin /models
USER dtwin
WORKDIR /home/dtwin

# The controller's Prometheus exporter and Faust web port.
EXPOSE 9108 6066
CMD ["dtwin", "--help"]

FROM controller AS train
USER root
ENV MPLBACKEND=Agg
# torch from the CPU wheel index: the PyPI wheel of the same version is a multi-GB CUDA build.
# `.[train]` pins torch==2.13.0, which the installed 2.13.0+cpu already satisfies.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
RUN cd /src && python -c "import subprocess, sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = [d for d in p['optional-dependencies']['train'] if not d.startswith('torch')]; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])"
USER dtwin
