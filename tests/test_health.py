from __future__ import annotations

import httpx
import pytest
from django.db import connection
from django.test import override_settings

from conftest import ON_MYSQL, ON_REDIS

DEAD_REDIS = "redis://127.0.0.1:1/0"


def dead_redis_settings():
    cache = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": DEAD_REDIS,
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1},
    }
    return override_settings(REDIS_DSN=DEAD_REDIS, CACHES={"default": cache})


@pytest.mark.django_db
def test_it_is_healthy_with_the_database_up(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["checks"]["database"]["status"] == "up"
    assert body["timestamp"].endswith("Z")
    assert set(body) >= {"uptime", "uptime_seconds", "role"}
    assert ("redis" in body["checks"]) is ON_REDIS


@pytest.mark.skipif(not ON_REDIS, reason="Redis is only checked when REDIS_DSN is set")
@pytest.mark.django_db
def test_it_checks_redis_when_configured(client):
    assert client.get("/health").json()["checks"]["redis"]["status"] == "up"


@pytest.mark.django_db
def test_it_is_unhealthy_when_redis_is_down(client):
    with dead_redis_settings():
        response = client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["checks"]["redis"]["status"] == "down"
    assert "ConnectionError" in body["checks"]["redis"]["error"]
    assert body["checks"]["database"]["status"] == "up"


@pytest.mark.skipif(not ON_MYSQL, reason="SQLite's in-memory test database cannot be taken away")
@pytest.mark.django_db(transaction=True)
def test_it_is_unhealthy_when_mysql_is_down(client):
    original = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict["PORT"] = 1  # nothing listens there
    try:
        response = client.get("/health")
    finally:
        connection.close()
        connection.settings_dict.update(original)
    assert_database_down(response.status_code, response.json())


def test_it_is_unhealthy_when_the_sqlite_file_is_gone(serve, tmp_path):
    folder = tmp_path / "db"
    server = serve(env={"DATABASE_DSN": str(folder / "gptload.db")})
    server.wait_ready()
    assert httpx.get(server.url + "/health").status_code == 200
    folder.rename(tmp_path / "moved")  # the disk the database lives on goes away
    response = httpx.get(server.url + "/health")
    assert_database_down(response.status_code, response.json())
    (tmp_path / "moved").rename(folder)
    assert httpx.get(server.url + "/health").status_code == 200  # and it recovers


def assert_database_down(status: int, body: dict) -> None:
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["checks"]["database"]["status"] == "down"
    assert "OperationalError" in body["checks"]["database"]["error"]


def test_only_get_is_allowed(client):
    assert client.post("/health").status_code == 405
