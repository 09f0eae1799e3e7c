# One image for every dtwin service of docker-compose.yml (topics, model, controller, replay).
# It carries the controller runtime and the training/export stack (torch, CPU build).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    DTWIN_MODEL_DIR=/models/current \
    DTWIN_METRICS_PORT=9108 \
    DTWIN_WEB_PORT=6066

# torch first, from the CPU wheel index: the PyPI wheel of the same version is a multi-GB CUDA
# build. `.[train]` pins torch==2.13.0, which the installed 2.13.0+cpu already satisfies.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src

# Dependency layer: the runtime and extras [controller,train] read from pyproject.toml, so a code
# change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import subprocess, sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = p['dependencies'] + [d for e in ('controller', 'train') for d in p['optional-dependencies'][e]]; \
deps = [d for d in deps if not d.startswith('dtwin')]; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])"

# The project itself; .dockerignore keeps the context to the packages and pyproject.toml.
COPY . ./
RUN pip install --no-deps . \
    && dtwin --help > /dev/null

RUN useradd --create-home --uid 10001 dtwin \
    && mkdir -p /models /data \
    && chown dtwin:dtwin /models
USER dtwin
WORKDIR /home/dtwin

# The controller's Prometheus exporter and Faust web port.
EXPOSE 9108 6066

CMD ["dtwin", "--help"]
