# Sourced by .ci/run: a private PostgreSQL cluster for the tests, in a temporary folder,
# listening on 127.0.0.1 only (a free port) and a socket in that folder, password auth.
# Run as root, the cluster belongs to the `postgres` user (initdb refuses root).
#   pg_cluster_start DIR   -> sets PG_ADMIN_URL (postgresql://postgres:PASSWORD@127.0.0.1:PORT/postgres)
#   pg_cluster_stop DIR    -> stops the cluster and removes DIR

pg_bin_dir() {
    local found
    found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -z "$found" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "PostgreSQL is not installed: installing it from the machine's package registry" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }
        found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    fi
    [ -n "$found" ] || { echo "error: no PostgreSQL under /usr/lib/postgresql/" >&2; return 1; }
    echo "$found"
}

as_cluster_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_cluster_start() {
    local dir="$1" bin port password
    bin="$(pg_bin_dir)"
    mkdir -p "$dir"
    password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    printf '%s\n' "$password" > "$dir/pwfile"
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
        chown -R postgres "$dir"
    fi
    chmod 700 "$dir"
    as_cluster_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 \
        --pwfile="$dir/pwfile" --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; return 1; }
    rm -f "$dir/pwfile"
    # A throw-away cluster: durability settings off, room for every test's connections.
    as_cluster_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start -o \
        "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir \
         -c max_connections=400 -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c shared_buffers=64MB" >/dev/null ||
        { cat "$dir/server.log" >&2; return 1; }
    PG_ADMIN_URL="postgresql://postgres:$password@127.0.0.1:$port/postgres"
    export PG_ADMIN_URL
}

pg_cluster_stop() {
    local dir="$1" bin
    bin="$(pg_bin_dir)"
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_cluster_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}
