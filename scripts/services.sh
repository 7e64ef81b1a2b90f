#!/usr/bin/env bash
# Start the local services the integration tests use, if they are not running already.
# These are the same commands the development machines use to start them.
set -u

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; }

if ! pg_up; then
  echo "services: starting PostgreSQL"
  for v in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  done
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! redis_up; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  for _ in $(seq 1 30); do redis_up && break; sleep 1; done
fi

ok=0
pg_up && echo "services: PostgreSQL up on 127.0.0.1:5432" || { echo "services: PostgreSQL is NOT reachable"; ok=1; }
redis_up && echo "services: Redis up on 127.0.0.1:6379" || { echo "services: Redis is NOT reachable"; ok=1; }
exit $ok
