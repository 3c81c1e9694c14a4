# The image of leader-cron.yaml: the job's own image plus the `elector` binary, nothing else.
# Build: docker build -f deploy/examples/leader-cron.Dockerfile -t ghcr.io/elector-dev/report-cron:0.1.0 .
FROM ghcr.io/elector-dev/elector:0.1.0 AS elector

FROM debian:bookworm-slim
COPY --from=elector /usr/local/bin/elector /usr/local/bin/elector
