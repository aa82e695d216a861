# One image, three processes: `loraforge api`, `loraforge worker`, `loraforge engine`
# (or `loraforge serve` for all three on one machine).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 LORAFORGE_HOME=/data \
    LORAFORGE_API_HOST=0.0.0.0 LORAFORGE_ENGINE_HOST=0.0.0.0
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
RUN mkdir -p src/loraforge && touch src/loraforge/__init__.py \
    && pip install torch==2.13.0 -e . && rm -rf src
COPY configs ./configs
COPY src ./src
RUN pip install --no-deps -e .

VOLUME /data
EXPOSE 8000 8100 9101
ENTRYPOINT ["loraforge"]
CMD ["serve"]
