#!/bin/sh
# The image's entrypoint: its first argument picks the role, the rest goes to that role.
#
#   web [serve options]   `manage.py serve` (the default): migrations unless IS_SLAVE=true,
#                         then the web server; with no REDIS_DSN on a master node, the
#                         embedded Celery worker and beat too.
#   worker [options]      `celery -A gptload worker`: key imports, validations, periodic jobs.
#   beat [options]        `celery -A gptload beat`: the schedules; exactly one per cluster.
#   anything else         run as given (`python manage.py auth_key`, `sh`, ...).
#
# Each role's process replaces this shell (exec), so SIGTERM from `docker stop` reaches it.
set -eu

role=${1:-web}
[ "$#" -gt 0 ] && shift

# Celery's --loglevel from LOG_LEVEL (debug, info, warn or warning, error).
level=$(printf '%s' "${LOG_LEVEL:-info}" | tr '[:lower:]' '[:upper:]')
[ "$level" = WARN ] && level=WARNING

# Nodes of a cluster must share the admin key and Django's signing key; left unset, each
# would make its own. The Compose file's cluster profile sets GPTLOAD_REQUIRE_SECRETS.
if [ "${GPTLOAD_REQUIRE_SECRETS:-false}" = true ]; then
    case "$role" in
        web | serve | worker | beat)
            for name in AUTH_KEY SECRET_KEY; do
                if [ -z "$(printenv "$name" | tr -d '[:space:]')" ]; then
                    echo "error: $name is not set: every node of a cluster needs the same one" \
                        "(set it in .env, see .env.example)" >&2
                    exit 64
                fi
            done
            ;;
    esac
fi

# docker/healthcheck.py checks what this container runs.
remember() {
    printf '%s\n' "$1" > /tmp/gptload-role 2>/dev/null || true
}

case "$role" in
    web | serve)
        remember web
        exec python manage.py serve "$@"
        ;;
    worker)
        remember worker
        exec celery -A gptload worker --loglevel="$level" "$@"
        ;;
    beat)
        remember beat
        exec celery -A gptload beat --loglevel="$level" "$@"
        ;;
    *)
        remember other
        exec "$role" "$@"
        ;;
esac
