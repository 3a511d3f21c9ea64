"""Where the local plant keeps everything under its root (default .millrace/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class PlantLayout:
    """Paths of one plant; nothing here touches the disk."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "plant.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def pgpass(self) -> Path:
        return self.secrets / "pgpass"

    @property
    def pg_superuser_password(self) -> Path:
        return self.secrets / "postgres-password"

    @property
    def admin_password(self) -> Path:
        return self.secrets / "dashboard-admin-password"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def local_mqtt(self) -> Path:
        return self.root / "gateway-mqtt"

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def patroni(self) -> Path:
        return self.root / "patroni"

    @property
    def ingest_config(self) -> Path:
        return self.root / "ingest.toml"

    @property
    def alert_rules(self) -> Path:
        return self.root / "alert-rules.toml"

    @property
    def dashboard_config(self) -> Path:
        return self.root / "dashboard.toml"

    @property
    def dashboard_users(self) -> Path:
        return self.secrets / "dashboard-users.toml"

    @property
    def sim(self) -> Path:
        return self.root / "sim"

    @property
    def manifest(self) -> Path:
        return self.sim / "manifest.json"

    def gateway_dir(self, gateway_id: str) -> Path:
        return self.root / "gateways" / gateway_id
