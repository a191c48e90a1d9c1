# Airflow with tirelib, its DAGs and plugins: the official image of the pinned Airflow version,
# extended as Airflow's docs describe ("Customizing the image": add packages as the airflow user,
# keeping apache-airflow at the image's version so pip can never up- or downgrade it).
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t tirelib-airflow .
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

# CPU wheels of torch/torchvision by default (workers of the `default` queue). For GPU workers
# of the `training` queue build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Folders the compose stack mounts named volumes on: a new volume takes their owner.
USER 0
RUN install -d -o airflow -g root -m 0770 /opt/airflow/auth /opt/airflow/tire

# The image's own user (uid 50000), by name as Airflow's docs write it.
# hadolint ignore=DL3066
USER airflow
WORKDIR /opt/airflow

# The exact pins of requirements.txt. The CUDA runtime wheels it lists (nvidia-*, cuda-*, triton)
# are dropped: the torch wheel of TORCH_INDEX_URL brings the ones it needs.
COPY --chown=airflow:root requirements.txt /tmp/tirelib/requirements.txt
RUN grep -vE '^(nvidia-|cuda-|triton==)' /tmp/tirelib/requirements.txt > /tmp/tirelib/pins.txt \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        "apache-airflow==${AIRFLOW_VERSION}" -r /tmp/tirelib/pins.txt

# tirelib itself; its dependencies are the pins above.
COPY --chown=airflow:root pyproject.toml README.md /tmp/tirelib/src/
COPY --chown=airflow:root tirelib /tmp/tirelib/src/tirelib
RUN pip install --no-cache-dir --no-deps /tmp/tirelib/src

COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins

ENV TIRE_HOME=/opt/airflow/tire \
    TIRE_DAGS_FOLDER=/opt/airflow/dags
