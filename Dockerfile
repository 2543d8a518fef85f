# Build and run session-gateway. Used by docker-compose.yml.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin session-gateway

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/session-gateway /usr/local/bin/session-gateway
COPY conf /etc/session-gateway
WORKDIR /var/lib/session-gateway
EXPOSE 6188
ENTRYPOINT ["session-gateway"]
CMD ["-c", "/etc/session-gateway/gateway.yaml"]
