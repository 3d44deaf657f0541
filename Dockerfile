# syntax=docker/dockerfile:1
#
# eventpipe image: one binary, every stage is a subcommand
# (`eventpipe dispatch|log|aggregate|topics apply ...`). See docs/docker.md.

# ---- build ---------------------------------------------------------------
FROM rust:1-bookworm AS builder

# rdkafka is built from source (cmake-build) with the ssl and zstd features.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config g++ \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The registry and target dirs live in cache mounts, so they are not in the
# image layer: copy the binary out within the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin eventpipe \
 && cp target/release/eventpipe /usr/local/bin/eventpipe

# ---- runtime -------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 eventpipe \
 && useradd --system --uid 10001 --gid eventpipe --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin eventpipe

COPY --from=builder /usr/local/bin/eventpipe /usr/local/bin/eventpipe
COPY topics/ /etc/eventpipe/topics/
COPY schemas/ /etc/eventpipe/schemas/
COPY migrations/ /etc/eventpipe/migrations/

USER eventpipe:eventpipe
# so the default `--file topics/topics.toml` of `eventpipe topics ...` resolves
WORKDIR /etc/eventpipe
ENV EVENTPIPE_METRICS_ADDRESS=0.0.0.0:9464
# Prometheus metrics
EXPOSE 9464

ENTRYPOINT ["eventpipe"]
CMD ["--help"]
