# oidc-edge container image: a fully static binary in an empty (scratch) image, run as a
# numeric non-root user, with no shell. Base images are build arguments, so that the image
# builds against any registry or mirror:
#
#   podman build --format docker -t oidc-edge .
#   podman run --rm -p 8080:8080 oidc-edge            # the demo key set on :8080
#   podman run --rm -p 8080:8080 -v ./config.toml:/etc/oidc-edge/config.toml:ro oidc-edge
#
# `--format docker`: podman and buildah write the OCI format by default, which has no
# HEALTHCHECK; they drop it with a warning. `docker build` keeps it.
#
# Multi-arch: each platform is built natively, in a builder image of its own architecture
# (pulled for that platform; under qemu-user emulation, package qemu-user-static, when it is
# not the host's), never cross-compiled:
#
#   podman build --format docker --platform linux/amd64,linux/arm64 --manifest oidc-edge:0.1.0 .
#
# Only amd64 is built and tested here (scripts/container-test); the arm64 build is not.
#
# Health: HEALTHCHECK runs `oidc-edge healthcheck`, which GETs /readyz on the admin listener
# that the config's admin.listen names (0.0.0.0:9090 is asked on 127.0.0.1:9090): a scratch
# image has no shell or curl. It reads the config that `serve` reads by default; to serve
# another file, set OIDC_EDGE_CONFIG rather than --config, so that both read the same one.
# Kubernetes ignores HEALTHCHECK: give it probes on :9090/livez and :9090/readyz.
#
# No CA bundle either, on purpose: apiservers are trusted through their pinned CA only, and
# `url` sources without ca_file, bucket stores, the doctor's fetch and its TLS probe all use
# Mozilla's roots compiled into the binary (webpki-roots), never the system's (review finding
# L9). A private or corporate CA is added the same way, compiled in beside them:
#
#   podman build --format docker --build-arg EXTRA_ROOTS_PEM="$(cat corp-root-ca.pem)" -t oidc-edge .
#
# (`oidc-edge check-config` then says "roots  Mozilla's and N CA certificate(s) added at
# build time"; a file that is not PEM CA certificates fails the build.)

ARG BUILDER=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME=scratch

FROM ${BUILDER} AS build
# The platform's architecture (linux/arm64 gives arm64), set by docker buildx and newer
# podman; buildah 1.28 (Debian 12) leaves it empty unless given: the builder's own then.
ARG TARGETARCH
# PEM CA certificates to trust beside Mozilla's roots (see above); empty: none.
ARG EXTRA_ROOTS_PEM=""
WORKDIR /src
COPY . .
# crt-static on the gnu target gives a static-pie binary that runs in an empty image.
# The release profile (fat LTO, one codegen unit) keeps it small. The target is the one of
# the platform asked for, and must be the builder's own: with a builder of another
# architecture, cargo would cross-compile, which this image has no linker for.
RUN --mount=type=cache,target=/src/target \
    set -eu; \
    host=$(rustc --print host-tuple); \
    case "${TARGETARCH:-}" in \
      amd64) target=x86_64-unknown-linux-gnu ;; \
      arm64) target=aarch64-unknown-linux-gnu ;; \
      '') target=$host ;; \
      *) echo "TARGETARCH=$TARGETARCH: only amd64 and arm64 are built" >&2; exit 1 ;; \
    esac; \
    if [ "$target" != "$host" ]; then \
      echo "the builder runs $host, not $target: use a builder image of the target platform" >&2; \
      exit 1; \
    fi; \
    echo "building $target (TARGETARCH=${TARGETARCH:-unset})"; \
    if [ -n "$EXTRA_ROOTS_PEM" ]; then \
      printf '%s\n' "$EXTRA_ROOTS_PEM" > /tmp/extra-roots.pem; \
      export OIDC_EDGE_EXTRA_ROOTS=/tmp/extra-roots.pem; \
    fi; \
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --locked --release --target "$target"; \
    mkdir -p /out/etc/oidc-edge /out/var/lib/oidc-edge; \
    cp "target/$target/release/oidc-edge" /out/oidc-edge; \
    cp config/container.toml /out/etc/oidc-edge/config.toml; \
    cp config/demo-jwks.json /out/etc/oidc-edge/demo-jwks.json

FROM ${RUNTIME}
COPY --from=build /out/oidc-edge /oidc-edge
COPY --from=build /out/etc/oidc-edge /etc/oidc-edge
COPY --from=build --chown=65532:65532 /out/var/lib/oidc-edge /var/lib/oidc-edge
USER 65532:65532
EXPOSE 8080 9090
# The default --timeout of the check is 3 s, under the 5 s given here. Until the first key set
# is published (an apiserver may take a few tries), failures within start-period do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/oidc-edge", "healthcheck"]
VOLUME ["/var/lib/oidc-edge"]
ENTRYPOINT ["/oidc-edge"]
CMD ["serve", "--config", "/etc/oidc-edge/config.toml"]
