# One image for the telemetry stack (see docker-compose.yml), in two targets:
#   worker: the Celery workers (tasks/), Flower, and the operator's commands an operator runs
#           inside the stack (telemetry_ops/: `rubrix-telemetry status`, the audit collector and
#           the Prometheus exporter `rubrix-telemetry metrics`);
#   rubrix: the same plus the real Rubrix 0.18 server (`rubrix-telemetry server`).
# The demo (telemetry_ops/demo.py) starts its own worker, server and collector on one machine:
# it is for a checkout, not for a container, and .dockerignore leaves it out of both images.
# Build one with `docker build --target worker .` (the default is the last target, rubrix).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS worker
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The installation id (and the embedded queue, when no broker is set) live here: a volume.
    RUBRIX_TELEMETRY_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY telemetry_core ./telemetry_core
COPY rubrix_hooks ./rubrix_hooks
COPY tasks ./tasks
COPY telemetry_ops ./telemetry_ops
RUN pip install ".[flower,metrics]"
# Celery warns, for good reason, when run as root: run as a plain user. A named volume
# mounted on an existing folder starts with its ownership (/audit: the audit collector's).
RUN useradd --create-home --uid 1000 telemetry && mkdir -p /data /audit && chown telemetry /data /audit
USER telemetry
CMD ["celery", "-A", "tasks", "worker", "-Q", "telemetry", "-E", "-l", "INFO"]

FROM worker AS rubrix
USER root
# Rubrix 0.18 declares pins that do not build on Python 3.11 (wrapt~=1.13, PyYAML~=5.4):
# install it without them, then the checked set of its dependencies.
COPY requirements/rubrix-0.18-server.txt /tmp/rubrix-0.18-server.txt
RUN pip install --no-deps rubrix==0.18.0 \
    && pip install -r /tmp/rubrix-0.18-server.txt \
    && pip install ".[server]"
USER telemetry
EXPOSE 6900
CMD ["rubrix-telemetry", "server", "--host", "0.0.0.0", "--port", "6900"]
