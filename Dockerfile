# One image, four entrypoints: `docker run kafkify api-rest` (or api-grpc, cdc-relay, worker),
# and the operator's kafkifyctl (`kubectl exec deploy/cdc-relay -- kafkifyctl status`).
# Each binary also applies its own migrations: `docker run kafkify api-rest migrate`.
#
#   docker build -t kafkify:dev .
#
# Stages: `planner` reduces the workspace to its dependency recipe (cargo-chef), `deps` builds
# only the dependencies from it (a layer that changes only with Cargo.lock or a manifest), `build`
# compiles the workspace, `runtime` is Debian slim with the five binaries, run as a non-root user.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
# librdkafka is built from source by rdkafka-sys (cmake), with OpenSSL and zstd.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev libzstd-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS deps
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json

FROM deps AS build
COPY . .
RUN cargo build --release --locked -p api-rest -p api-grpc -p cdc-relay -p worker -p kafkifyctl --bins \
 && mkdir /out \
 && cp target/release/api-rest target/release/api-grpc target/release/cdc-relay target/release/worker \
       target/release/kafkifyctl /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# curl only for container health checks (compose); Kubernetes probes use HTTP directly.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libzstd1 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin kafkify
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
ENV LOG_FORMAT=json
# api-rest 8080, api-grpc 9090 (gRPC) and 8090, cdc-relay 8091, worker 8092.
EXPOSE 8080 8090 8091 8092 9090
ENTRYPOINT []
CMD ["api-rest"]
