# herald: one binary, every role. Built with the `dist` profile (release with whole-program
# optimisation; README, "The `dist` profile": faster and smaller, a slow build); librdkafka
# is compiled from the rdkafka-sys crate's bundled sources (make + gcc from the rust image) and
# linked statically.
#   docker build -t herald .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked --bin herald

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/herald --create-home herald
COPY --from=build /src/target/dist/herald /usr/local/bin/herald
USER herald
WORKDIR /var/lib/herald
ENV HERALD_DATA_DIR=/var/lib/herald
ENTRYPOINT ["herald"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
