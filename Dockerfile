# oidc-edge container image: a fully static binary in an empty (scratch) image, run as a
# numeric non-root user, with no shell. Base images are build arguments, so that the image
# builds against any registry or mirror:
#
#   podman build -t oidc-edge .
#   podman run --rm -p 8080:8080 oidc-edge            # the demo key set on :8080
#   podman run --rm -p 8080:8080 -v ./config.toml:/etc/oidc-edge/config.toml:ro oidc-edge
#
# Health: GET :9090/livez and :9090/readyz (the admin listener), not a HEALTHCHECK: the image
# has no shell or curl to run one.
#
# No CA bundle either, on purpose: apiservers are trusted through their pinned CA only, and
# `url` sources without ca_file, the doctor's fetch and its TLS probe all use Mozilla's roots
# compiled into the binary (webpki-roots), never the system's (review finding L9).

ARG BUILDER=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME=scratch

FROM ${BUILDER} AS build
WORKDIR /src
COPY . .
# crt-static on the gnu target gives a static-pie binary that runs in an empty image.
# The release profile (fat LTO, one codegen unit) keeps it small.
RUN --mount=type=cache,target=/src/target \
    RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --locked --release --target x86_64-unknown-linux-gnu \
 && mkdir -p /out/etc/oidc-edge /out/var/lib/oidc-edge \
 && cp target/x86_64-unknown-linux-gnu/release/oidc-edge /out/oidc-edge \
 && cp config/container.toml /out/etc/oidc-edge/config.toml \
 && cp config/demo-jwks.json /out/etc/oidc-edge/demo-jwks.json

FROM ${RUNTIME}
COPY --from=build /out/oidc-edge /oidc-edge
COPY --from=build /out/etc/oidc-edge /etc/oidc-edge
COPY --from=build --chown=65532:65532 /out/var/lib/oidc-edge /var/lib/oidc-edge
USER 65532:65532
EXPOSE 8080 9090
VOLUME ["/var/lib/oidc-edge"]
ENTRYPOINT ["/oidc-edge"]
CMD ["serve", "--config", "/etc/oidc-edge/config.toml"]
