# The model server: TensorFlow Serving's REST API on :8501, CPU-only torch, non-root.
# Build from the repository root:  docker build -f docker/server.Dockerfile -t tirelib-server .
FROM python:3.11-slim-bookworm AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# requirements.txt's pins serve as constraints (without the CUDA wheels, which the CPU build of
# torch does not use, and without extras, which pip refuses in a constraints file).
COPY requirements.txt /tmp/tirelib/requirements.txt
RUN sed -E -e 's/\[[a-z,]+\]//' -e '/^(nvidia-|cuda-|triton==)/d' \
        /tmp/tirelib/requirements.txt > /tmp/tirelib/constraints.txt \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        -c /tmp/tirelib/constraints.txt torch torchvision

COPY pyproject.toml README.md /tmp/tirelib/src/
COPY tirelib /tmp/tirelib/src/tirelib
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        -c /tmp/tirelib/constraints.txt /tmp/tirelib/src


FROM python:3.11-slim-bookworm AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/tirelib \
    TIRE_HOME=/home/tirelib/.tire \
    TIRE_SERVE_HOST=0.0.0.0 \
    TIRE_SERVE_PORT=8501

RUN useradd --system --uid 10001 --create-home --home-dir /home/tirelib tirelib
COPY --from=builder /opt/venv /opt/venv

USER 10001
WORKDIR /home/tirelib
EXPOSE 8501
# The slim image has no curl: ask with Python's urllib. /readyz answers 200 once a model is loaded.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/readyz', timeout=4)"]
CMD ["tirelib", "serve", "--host", "0.0.0.0", "--port", "8501"]
