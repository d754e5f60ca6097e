# qsmprep container: multi-stage build on a pinned Python base, runs as uid 1000.
# Build:  docker build -t qsmprep:latest .
# Run:    docker run --rm -v /data/bids:/data:ro -v /data/out:/out qsmprep:latest /data /out participant

FROM python:3.11.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY qsmprep ./qsmprep
COPY workflows ./workflows
COPY interfaces ./interfaces
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/qsmprep --version > /opt/venv/qsmprep-version

FROM python:3.11.11-slim-bookworm
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="qsmprep" \
      org.opencontainers.image.description="BIDS App for quantitative susceptibility mapping (QSM)" \
      org.opencontainers.image.source="https://github.com/qsmprep/qsmprep" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}"
COPY --from=builder /opt/venv /opt/venv
RUN useradd --uid 1000 --no-log-init --create-home --shell /bin/bash qsmprep \
    && cp /opt/venv/qsmprep-version /version
ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    NIPYPE_NO_ET=1 \
    PYTHONUNBUFFERED=1 \
    QSMPREP_DOCKER_TAG=qsmprep:latest
USER 1000
WORKDIR /home/qsmprep
ENTRYPOINT ["qsmprep"]
