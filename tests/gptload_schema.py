"""A GPT-Load 1.4.9 database, built the way GPT-Load builds it, for the import tests.

The tables are what GORM's AutoMigrate makes of GPT-Load's models
(`internal/models/types.go` at v1.4.9) on SQLite (glebarez/sqlite) and on MySQL/MariaDB:
the same names, column types, defaults and indexes. Values are written as GPT-Load's
drivers write them: on SQLite times are text with nanoseconds and an offset and
booleans 0/1; on MariaDB times are `datetime(3)` in the DSN's `loc` (here UTC+8). Keys are encrypted with
GPT-Load's scheme (ours: `gptload.lib.crypto` is the same AES-256-GCM) when the world is
built with an ENCRYPTION_KEY.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from gptload.lib.crypto import Cipher

SQLITE_DDL = """
CREATE TABLE `system_settings` (`id` integer PRIMARY KEY AUTOINCREMENT,`setting_key` varchar(255) NOT NULL,`setting_value` text NOT NULL,`description` varchar(512),`created_at` datetime,`updated_at` datetime,CONSTRAINT `uni_system_settings_setting_key` UNIQUE (`setting_key`));
CREATE TABLE `groups` (`id` integer PRIMARY KEY AUTOINCREMENT,`name` varchar(255) NOT NULL,`display_name` varchar(255),`proxy_keys` text,`description` varchar(512),`group_type` varchar(50) DEFAULT 'standard',`upstreams` json NOT NULL,`validation_endpoint` varchar(255),`channel_type` varchar(50) NOT NULL,`sort` integer DEFAULT 0,`test_model` varchar(255) NOT NULL,`param_overrides` json,`config` json,`header_rules` json,`model_redirect_rules` json,`model_redirect_strict` numeric DEFAULT false,`last_validated_at` datetime,`created_at` datetime,`updated_at` datetime,CONSTRAINT `uni_groups_name` UNIQUE (`name`));
CREATE TABLE `group_sub_groups` (`id` integer PRIMARY KEY AUTOINCREMENT,`group_id` integer NOT NULL,`sub_group_id` integer NOT NULL,`weight` integer DEFAULT 0,`created_at` datetime,`updated_at` datetime);
CREATE UNIQUE INDEX `idx_group_sub` ON `group_sub_groups`(`group_id`,`sub_group_id`);
CREATE TABLE `api_keys` (`id` integer PRIMARY KEY AUTOINCREMENT,`key_value` text NOT NULL,`key_hash` varchar(128),`group_id` integer NOT NULL,`status` varchar(50) NOT NULL DEFAULT 'active',`notes` varchar(255) DEFAULT '',`request_count` integer NOT NULL DEFAULT 0,`failure_count` integer NOT NULL DEFAULT 0,`last_used_at` datetime,`created_at` datetime,`updated_at` datetime,CONSTRAINT `fk_groups_api_keys` FOREIGN KEY (`group_id`) REFERENCES `groups`(`id`));
CREATE INDEX `idx_api_keys_group_last_used_id` ON `api_keys`(`group_id`,`last_used_at`,`id`);
CREATE INDEX `idx_api_keys_status` ON `api_keys`(`status`);
CREATE INDEX `idx_api_keys_group_id` ON `api_keys`(`group_id`);
CREATE INDEX `idx_api_keys_key_hash` ON `api_keys`(`key_hash`);
CREATE TABLE `request_logs` (`id` varchar(36),`timestamp` datetime NOT NULL,`group_id` integer NOT NULL,`group_name` varchar(255),`parent_group_id` integer,`parent_group_name` varchar(255),`key_value` text,`key_hash` varchar(128),`model` varchar(255),`is_success` numeric NOT NULL,`source_ip` varchar(64),`status_code` integer NOT NULL,`request_path` varchar(500),`duration_ms` integer NOT NULL,`error_message` text,`user_agent` varchar(512),`request_type` varchar(20) NOT NULL DEFAULT 'final',`upstream_addr` varchar(500),`is_stream` numeric NOT NULL,`request_body` text,PRIMARY KEY (`id`));
CREATE INDEX `idx_request_logs_timestamp` ON `request_logs`(`timestamp`);
CREATE INDEX `idx_request_logs_group_id` ON `request_logs`(`group_id`);
CREATE INDEX `idx_request_logs_key_hash` ON `request_logs`(`key_hash`);
CREATE INDEX `idx_request_logs_request_type` ON `request_logs`(`request_type`);
CREATE TABLE `group_hourly_stats` (`id` integer PRIMARY KEY AUTOINCREMENT,`time` datetime NOT NULL,`group_id` integer NOT NULL,`success_count` integer NOT NULL DEFAULT 0,`failure_count` integer NOT NULL DEFAULT 0,`created_at` datetime,`updated_at` datetime);
CREATE UNIQUE INDEX `idx_group_time` ON `group_hourly_stats`(`time`,`group_id`);
"""

MYSQL_DDL = """
CREATE TABLE `system_settings` (`id` bigint unsigned AUTO_INCREMENT,`setting_key` varchar(255) NOT NULL,`setting_value` text NOT NULL,`description` varchar(512),`created_at` datetime(3) NULL,`updated_at` datetime(3) NULL,PRIMARY KEY (`id`),CONSTRAINT `uni_system_settings_setting_key` UNIQUE (`setting_key`));
CREATE TABLE `groups` (`id` bigint unsigned AUTO_INCREMENT,`name` varchar(255) NOT NULL,`display_name` varchar(255),`proxy_keys` text,`description` varchar(512),`group_type` varchar(50) DEFAULT 'standard',`upstreams` json NOT NULL,`validation_endpoint` varchar(255),`channel_type` varchar(50) NOT NULL,`sort` bigint DEFAULT 0,`test_model` varchar(255) NOT NULL,`param_overrides` json,`config` json,`header_rules` json,`model_redirect_rules` json,`model_redirect_strict` boolean DEFAULT false,`last_validated_at` datetime(3) NULL,`created_at` datetime(3) NULL,`updated_at` datetime(3) NULL,PRIMARY KEY (`id`),CONSTRAINT `uni_groups_name` UNIQUE (`name`));
CREATE TABLE `group_sub_groups` (`id` bigint unsigned AUTO_INCREMENT,`group_id` bigint unsigned NOT NULL,`sub_group_id` bigint unsigned NOT NULL,`weight` bigint DEFAULT 0,`created_at` datetime(3) NULL,`updated_at` datetime(3) NULL,PRIMARY KEY (`id`),UNIQUE INDEX `idx_group_sub` (`group_id`,`sub_group_id`));
CREATE TABLE `api_keys` (`id` bigint unsigned AUTO_INCREMENT,`key_value` text NOT NULL,`key_hash` varchar(128),`group_id` bigint unsigned NOT NULL,`status` varchar(50) NOT NULL DEFAULT 'active',`notes` varchar(255) DEFAULT '',`request_count` bigint NOT NULL DEFAULT 0,`failure_count` bigint NOT NULL DEFAULT 0,`last_used_at` datetime(3) NULL,`created_at` datetime(3) NULL,`updated_at` datetime(3) NULL,PRIMARY KEY (`id`),INDEX `idx_api_keys_group_last_used_id` (`group_id`,`last_used_at`,`id`),INDEX `idx_api_keys_status` (`status`),INDEX `idx_api_keys_group_id` (`group_id`),INDEX `idx_api_keys_key_hash` (`key_hash`),CONSTRAINT `fk_groups_api_keys` FOREIGN KEY (`group_id`) REFERENCES `groups`(`id`));
CREATE TABLE `request_logs` (`id` varchar(36),`timestamp` datetime(3) NOT NULL,`group_id` bigint unsigned NOT NULL,`group_name` varchar(255),`parent_group_id` bigint unsigned,`parent_group_name` varchar(255),`key_value` text,`key_hash` varchar(128),`model` varchar(255),`is_success` boolean NOT NULL,`source_ip` varchar(64),`status_code` bigint NOT NULL,`request_path` varchar(500),`duration_ms` bigint NOT NULL,`error_message` text,`user_agent` varchar(512),`request_type` varchar(20) NOT NULL DEFAULT 'final',`upstream_addr` varchar(500),`is_stream` boolean NOT NULL,`request_body` text,PRIMARY KEY (`id`),INDEX `idx_request_logs_timestamp` (`timestamp`),INDEX `idx_request_logs_group_id` (`group_id`),INDEX `idx_request_logs_key_hash` (`key_hash`),INDEX `idx_request_logs_request_type` (`request_type`));
CREATE TABLE `group_hourly_stats` (`id` bigint unsigned AUTO_INCREMENT,`time` datetime(3) NOT NULL,`group_id` bigint unsigned NOT NULL,`success_count` bigint NOT NULL DEFAULT 0,`failure_count` bigint NOT NULL DEFAULT 0,`created_at` datetime(3) NULL,`updated_at` datetime(3) NULL,PRIMARY KEY (`id`),UNIQUE INDEX `idx_group_time` (`time`,`group_id`));
"""

DEFAULT_SETTINGS = {
    "app_url": "http://localhost:3001",
    "request_log_retention_days": "7",
    "request_log_write_interval_minutes": "1",
    "enable_request_body_logging": "false",
    "request_timeout": "600",
    "connect_timeout": "15",
    "idle_conn_timeout": "120",
    "response_header_timeout": "600",
    "max_idle_conns": "100",
    "max_idle_conns_per_host": "50",
    "proxy_url": "",
    "max_retries": "3",
    "blacklist_threshold": "3",
    "failover_status_codes": "400-403,405-999",
    "key_validation_interval_minutes": "60",
    "key_validation_concurrency": "10",
    "key_validation_timeout_seconds": "20",
}
GPTLOAD_AUTH_KEY = "sk-gptload-admin-0123456789abcd"  # seeded as the global proxy key
HOUR = datetime(2026, 7, 1, 12, tzinfo=UTC)
# GPT-Load ran in UTC+8: its SQLite driver wrote local times with their offset.
BEIJING = timezone(timedelta(hours=8))

# (id, name, fields): groups as GPT-Load's API stored them.
GROUPS: list[tuple[int, str, dict[str, Any]]] = [
    (1, "openai-main", {
        "display_name": "OpenAI main", "description": "gpt-4.1, gpt-4o",
        "group_type": "standard", "channel_type": "openai", "sort": 2,
        "upstreams": [{"url": "https://api.openai.com", "weight": 3},
                      {"url": "https://backup.example.com/v1", "weight": 0}],
        "test_model": "gpt-4.1-nano", "validation_endpoint": "",
        "param_overrides": {"temperature": 0.2},
        "config": {"max_retries": 5, "request_timeout": 120},
        "header_rules": [{"key": "X-Team", "value": "${GROUP_NAME}", "action": "set"}],
        "model_redirect_rules": {"gpt-4o": "gpt-4.1"}, "model_redirect_strict": True,
        "proxy_keys": "sk-group-main-1,sk-group-main-2",
    }),
    # An older row: the JSON columns GPT-Load added later are NULL.
    (2, "gemini-pool", {
        "display_name": "", "description": "", "group_type": "standard",
        "channel_type": "gemini", "sort": 0,
        "upstreams": [{"url": "https://generativelanguage.googleapis.com", "weight": 1}],
        "test_model": "gemini-2.0-flash-lite", "validation_endpoint": "",
        "param_overrides": None, "config": None, "header_rules": None,
        "model_redirect_rules": None, "model_redirect_strict": False, "proxy_keys": "",
    }),
    (3, "openai-backup", {
        "display_name": "Backup", "description": "", "group_type": "standard",
        "channel_type": "openai", "sort": 1,
        "upstreams": [{"url": "https://openai.example.net", "weight": 1}],
        "test_model": "gpt-4.1-nano", "validation_endpoint": "",
        "param_overrides": {}, "config": {}, "header_rules": [], "model_redirect_rules": {},
        "model_redirect_strict": False, "proxy_keys": "",
    }),
    (4, "openai-all", {
        "display_name": "All OpenAI", "description": "", "group_type": "aggregate",
        "channel_type": "openai", "sort": 0, "upstreams": [], "test_model": "-",
        "validation_endpoint": "", "param_overrides": {}, "config": {}, "header_rules": [],
        "model_redirect_rules": {}, "model_redirect_strict": False,
        "proxy_keys": "sk-aggregate-proxy",
    }),
]  # fmt: skip
# (aggregate id, member id, weight); 99 is a group deleted since.
MEMBERS = [(4, 1, 10), (4, 3, 0), (4, 99, 5)]


@dataclass(frozen=True)
class Key:
    group_id: int
    secret: str
    status: str = "active"
    notes: str = ""
    requests: int = 0
    failures: int = 0
    used: datetime | None = None


KEYS = [
    Key(1, "sk-main-aaaaaaaaaaaaaaaaaaaa", requests=120, used=HOUR),
    Key(1, "sk-main-bbbbbbbbbbbbbbbbbbbb"),
    Key(1, "sk-main-cccccccccccccccccccc", "invalid", "billing lapsed", 3, 7),
    Key(2, "AIzaSyA-gemini-key-0000000000000"),
    Key(2, "AIzaSyA-gemini-key-1111111111111", "invalid"),
    Key(3, "sk-main-aaaaaaaaaaaaaaaaaaaa"),  # the same secret serves two groups
]
LOG_IDS = [str(uuid.UUID(int=n + 1, version=4)) for n in range(4)]


class World:
    """Writes GPT-Load's rows through a DB-API connection of either database."""

    def __init__(self, connection: Any, dialect: str, cipher: Cipher) -> None:
        self.connection, self.dialect, self.cipher = connection, dialect, cipher
        self.cursor = connection.cursor()

    def create_tables(self) -> None:
        ddl = SQLITE_DDL if self.dialect == "sqlite" else MYSQL_DDL
        for statement in filter(None, (s.strip() for s in ddl.split(";"))):
            self.cursor.execute(statement)

    def time(self, moment: datetime | None) -> Any:
        if moment is None:
            return None
        if self.dialect == "sqlite":
            local = moment.astimezone(BEIJING)
            return local.strftime("%Y-%m-%d %H:%M:%S.%f") + "123" + local.strftime("%z")[:3] + ":00"
        # The Go driver under `loc=Asia%2FShanghai` (or `loc=Local` with that TZ).
        return moment.astimezone(BEIJING).replace(tzinfo=None)

    def insert(self, table: str, row: dict[str, Any]) -> None:
        mark = "?" if self.dialect == "sqlite" else "%s"
        columns = ", ".join(f"`{c}`" for c in row)
        self.cursor.execute(
            f"INSERT INTO `{table}` ({columns}) VALUES ({', '.join([mark] * len(row))})",  # noqa: S608
            list(row.values()),
        )

    def fill(self, *, settings: dict[str, str] | None = None) -> None:
        now = self.time(HOUR)
        for group_id, name, fields in GROUPS:
            row = {"id": group_id, "name": name, **fields, "created_at": now, "updated_at": now,
                   "last_validated_at": self.time(HOUR - timedelta(minutes=5))}  # fmt: skip
            for column in ("upstreams", "param_overrides", "config", "header_rules",
                           "model_redirect_rules"):  # fmt: skip
                row[column] = None if row[column] is None else json.dumps(row[column])
            row["model_redirect_strict"] = int(row["model_redirect_strict"])
            self.insert("groups", row)
        for aggregate, member, weight in MEMBERS:
            self.insert("group_sub_groups", {"group_id": aggregate, "sub_group_id": member,
                                             "weight": weight, "created_at": now,
                                             "updated_at": now})  # fmt: skip
        for key in KEYS:
            self.add_key(key)
        values = {**DEFAULT_SETTINGS, "proxy_keys": GPTLOAD_AUTH_KEY, **(settings or {})}
        for setting_key, value in values.items():
            self.insert("system_settings", {"setting_key": setting_key, "setting_value": value,
                                            "description": f"config.{setting_key}_desc",
                                            "created_at": now, "updated_at": now})  # fmt: skip
        self.fill_logs()
        self.connection.commit()

    def add_key(self, key: Key) -> None:
        now = self.time(HOUR)
        self.insert("api_keys", {
            "key_value": self.cipher.encrypt(key.secret), "key_hash": self.cipher.hash(key.secret),
            "group_id": key.group_id, "status": key.status, "notes": key.notes,
            "request_count": key.requests, "failure_count": key.failures,
            "last_used_at": self.time(key.used), "created_at": now, "updated_at": now,
        })  # fmt: skip

    def fill_logs(self) -> None:
        secret = KEYS[0].secret
        rows = [
            (LOG_IDS[0], 1, "openai-main", 0, "", 200, True, "final"),
            (LOG_IDS[1], 1, "openai-main", 4, "openai-all", 429, False, "retry"),
            (LOG_IDS[2], 3, "openai-backup", 4, "openai-all", 200, True, "final"),
            (LOG_IDS[3], 99, "deleted-group", 0, "", 500, False, "final"),
        ]
        for n, (log_id, group_id, name, parent_id, parent, status, ok, kind) in enumerate(rows):
            self.insert("request_logs", {
                "id": log_id, "timestamp": self.time(HOUR + timedelta(minutes=n)),
                "group_id": group_id, "group_name": name, "parent_group_id": parent_id,
                "parent_group_name": parent, "key_value": self.cipher.encrypt(secret),
                "key_hash": self.cipher.hash(secret), "model": "gpt-4.1",
                "is_success": int(ok), "source_ip": "203.0.113.9", "status_code": status,
                "request_path": "/proxy/openai-main/v1/chat/completions", "duration_ms": 840,
                "error_message": "" if ok else "rate limited", "user_agent": "",
                "request_type": kind, "upstream_addr": "https://api.openai.com/v1/chat/completions",
                "is_stream": int(n == 2), "request_body": "",
            })  # fmt: skip
        for group_id, successes, failures in ((1, 40, 2), (4, 12, 1), (99, 5, 5)):
            self.insert("group_hourly_stats", {
                "time": self.time(HOUR), "group_id": group_id, "success_count": successes,
                "failure_count": failures, "created_at": self.time(HOUR),
                "updated_at": self.time(HOUR),
            })  # fmt: skip
