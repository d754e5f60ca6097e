# qsmprep container: multi-stage build on a pinned Python base; runs as uid 1000.
# Build:
#   docker build --build-arg VCS_REF="$(git rev-parse HEAD)" \
#       --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t qsmprep:latest .
# Run:
#   docker run --rm -v /data/bids:/data:ro -v /data/out:/out qsmprep:latest /data /out participant
# Apptainer/Singularity (HPC):
#   apptainer build qsmprep.sif docker-daemon://qsmprep:latest
#   apptainer run --cleanenv -B /data qsmprep.sif /data/bids /data/out participant
# The builder stage's COPY and RUN lines are replayed in a fresh virtual environment by
# scripts/check_dockerfile_install.py (CI), because no Docker engine runs there.

FROM python:3.11.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY qsmprep ./qsmprep
COPY workflows ./workflows
COPY interfaces ./interfaces
# the package with its dependencies, the BIDS validator (bids-validator-deno, a dependency)
# included; both must start in the build
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/qsmprep --version \
    && /opt/venv/bin/bids-validator-deno --version
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
# provenance: version, commit and build date, and the exact versions of every package
RUN mkdir -p /opt/qsmprep \
    && /opt/venv/bin/qsmprep --version > /opt/qsmprep/VERSION \
    && echo "commit ${VCS_REF}" >> /opt/qsmprep/VERSION \
    && echo "built ${BUILD_DATE}" >> /opt/qsmprep/VERSION \
    && /opt/venv/bin/python --version >> /opt/qsmprep/VERSION \
    && /opt/venv/bin/pip freeze --all > /opt/qsmprep/requirements.lock

FROM python:3.11.11-slim-bookworm
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG VERSION=unknown
ARG IMAGE_TAG=qsmprep:latest
LABEL org.opencontainers.image.title="qsmprep" \
      org.opencontainers.image.description="BIDS App for quantitative susceptibility mapping (QSM)" \
      org.opencontainers.image.url="https://github.com/qsmprep/qsmprep" \
      org.opencontainers.image.source="https://github.com/qsmprep/qsmprep" \
      org.opencontainers.image.documentation="https://github.com/qsmprep/qsmprep#containers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="qsmprep developers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm"
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/qsmprep /opt/qsmprep
RUN useradd --uid 1000 --no-log-init --create-home --shell /bin/bash qsmprep \
    && ln -s /opt/qsmprep/VERSION /version
# One thread per library by default: qsmprep gives each step --omp-nthreads FFT/numba
# workers itself, and BLAS/OpenMP pools on top of that would oversubscribe the CPUs that
# --nprocs (or the cluster allocation) grants. Caches live in /tmp, writable for any uid
# (Apptainer runs as the calling user with a read-only image).
ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    NUMEXPR_NUM_THREADS=1 \
    NUMBA_NUM_THREADS=8 \
    NUMBA_CACHE_DIR=/tmp/qsmprep-numba \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/qsmprep-matplotlib \
    DENO_DIR=/tmp/qsmprep-deno \
    DENO_NO_UPDATE_CHECK=1 \
    NIPYPE_NO_ET=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QSMPREP_DOCKER_TAG=${IMAGE_TAG}
USER 1000
WORKDIR /home/qsmprep
ENTRYPOINT ["qsmprep"]
