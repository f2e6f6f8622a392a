# syntax=docker/dockerfile:1
# One image for all of Cedar's services: `cedar watcher`, `cedar puller`,
# `cedar mcs-allocator`. Built from this repository: docker build -t cedar .

# --- build: resolve and install the package into a self-contained venv ---
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/cedar
COPY pyproject.toml setup.py README.md ./
COPY cli/ cli/
COPY ops/ ops/
COPY runtime/ runtime/
COPY proto/ proto/
COPY services/ services/
# Bytecode is compiled here because the running container's root filesystem
# is read-only; pip and setuptools are not needed at run time.
RUN /opt/cedar/bin/pip install --no-compile . \
    && /opt/cedar/bin/pip uninstall --yes pip setuptools wheel \
    && /opt/cedar/bin/python -m compileall -q -j 0 /opt/cedar/lib

# --- run: the interpreter, the venv, an unprivileged user, nothing else ---
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 cedar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin cedar
COPY --from=build /opt/cedar /opt/cedar
ENV PATH=/opt/cedar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
USER 10001:10001
# Kubernetes uses the manifests' probes; this is for `docker run` and compose.
# CEDAR_METRICS_PORT must be set to the service's port (compose.yaml does).
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CEDAR_METRICS_PORT', '9101') + '/healthz', timeout=2)"]
ENTRYPOINT ["cedar"]
CMD ["--help"]
