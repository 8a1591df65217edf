"""Block mode without re-prefill: a vLLM KV connector that forks the winning candidate's KV.

Each block of block mode is a new vLLM request on prompt + accepted tokens (vLLM cannot fork a
running sequence). Prefix caching reuses only whole KV blocks (32 tokens on CPU, 16 on GPU), so
every one of the K candidates of the next block would recompute the accepted prefix's partial
last KV block: up to K x 31 prefill tokens per block, more work than the block's own K x M
decode tokens at M = 8. This connector removes that cost with vLLM's public KV-connector API:

- candidates of a block carry `extra_args["cdserve_block_group"]`; when one finishes at its
  max_tokens, the scheduler side keeps its KV blocks (`request_finished` -> delay free), keyed by
  its whole token sequence (prompt + output);
- the next block's K requests carry `extra_args["cdserve_fork"] = K`; their prompt *is* the winner's
  token sequence, so `get_num_new_matched_tokens` finds the kept blocks and reports the tokens
  past the prefix-cache hit (all but the last) as loadable now (synchronous load);
- the worker side copies the kept partial block(s) into the new request's freshly allocated
  blocks before the forward (`start_load_kv`); once all K have forked (vLLM may admit them over
  several steps) the whole group is released, the losers too;
- anything not forked within `hold_s` seconds (the last block of an answer, a client that went
  away) is released; a fork that finds nothing kept simply recomputes, so the connector is an
  optimisation, never a correctness dependency.

Targets vLLM's V1 model runner (`VLLM_USE_V2_MODEL_RUNNER=0`, which cdserve sets anyway).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.request import RequestStatus

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

GROUP_KEY = "cdserve_block_group"  # on a block's candidates: the group they are kept under
FORK_KEY = "cdserve_fork"  # on the next block's requests: how many will fork from a kept winner
CONNECTOR_NAME = "BlockForkConnector"
DEFAULT_HOLD_S = 5.0


def kv_transfer_config(hold_s: float) -> dict[str, Any]:
    """The engine argument that installs the connector."""
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": __name__, "kv_role": "kv_both",
            "kv_connector_extra_config": {"hold_s": hold_s}}


@dataclass
class _Kept:
    request_id: str
    group: str
    block_ids: list[int]
    since: float


@dataclass
class ForkMetadata(KVConnectorMetadata):
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src block, dst block)
    release: list[str] = field(default_factory=list)  # kept requests whose blocks may be freed now


class BlockForkConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self.hold_s = float(self._kv_transfer_config.get_from_extra_config("hold_s", DEFAULT_HOLD_S))
        # scheduler side
        self._kept: dict[tuple[int, ...], _Kept] = {}
        self._pending: dict[str, tuple[_Kept, int, int]] = {}  # fork request -> (source, local hit, K)
        self._served: dict[str, int] = {}  # group -> forks done from it
        self._copies: list[tuple[int, int]] = []
        self._release: set[str] = set()
        self._consumed: set[str] = set()  # groups forked from in this step
        # worker side
        self._kv_caches: list[torch.Tensor] = []
        self._finished: set[str] = set()

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # best effort: a fork that misses recomputes

    # -- scheduler side ----------------------------------------------------------------------------
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        group = (request.sampling_params.extra_args or {}).get(GROUP_KEY) if request.sampling_params else None
        # Only a candidate that ran to its block length can be continued; its KV covers every
        # token but the last sampled one. Nothing to fork if that ends on a whole block (the
        # prefix cache already holds it).
        if (group is None or request.status != RequestStatus.FINISHED_LENGTH_CAPPED
                or request.num_computed_tokens % self.block_size == 0
                or request.num_computed_tokens != request.num_tokens - 1):
            return False, None
        key = tuple(request.all_token_ids)
        if key in self._kept:  # two identical candidates: keep one
            return False, None
        self._kept[key] = _Kept(request.request_id, group, list(block_ids), time.monotonic())
        return True, None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        expected = (request.sampling_params.extra_args or {}).get(FORK_KEY) if request.sampling_params else None
        if not expected:
            return 0, False
        kept = self._kept.get(tuple(request.prompt_token_ids))
        need = request.num_prompt_tokens - 1 - num_computed_tokens
        if kept is None or need <= 0:
            return 0, False
        self._pending[request.request_id] = (kept, num_computed_tokens, int(expected))
        return need, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        pending = self._pending.pop(request.request_id, None)
        if pending is None or num_external_tokens == 0:
            return
        kept, start, expected = pending
        dst = blocks.get_block_ids()[0]
        first, last = start // self.block_size, (start + num_external_tokens - 1) // self.block_size
        self._copies += [(kept.block_ids[i], dst[i]) for i in range(first, last + 1) if kept.block_ids[i] != dst[i]]
        self._served[kept.group] = self._served.get(kept.group, 0) + 1
        if self._served[kept.group] >= expected:
            self._consumed.add(kept.group)  # released at the end of this step

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's copies, and the kept requests to free: the groups all K forks have been
        served from (the losers too) and anything kept longer than hold_s."""
        now = time.monotonic()
        for key in [k for k, v in self._kept.items() if v.group in self._consumed or now - v.since > self.hold_s]:
            kept = self._kept.pop(key)
            self._release.add(kept.request_id)
            self._served.pop(kept.group, None)
        meta = ForkMetadata(self._copies, sorted(self._release))
        self._copies, self._release, self._consumed = [], set(), set()
        self._pending.clear()  # a lookup and its allocation happen within one schedule()
        return meta

    # -- worker side -------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_caches = list(kv_caches.values())

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ForkMetadata)
        if meta.copies:
            from vllm.v1.worker.utils import copy_kv_cache_blocks_inplace

            copy_kv_cache_blocks_inplace(self._kv_caches, self._kv_cache_config.num_blocks, meta.copies)
        self._finished.update(meta.release)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._finished = self._finished, set()
        return (done or None), None
