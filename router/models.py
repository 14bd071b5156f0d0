"""The model this router serves, learned from the workers' registrations.

A worker registers its model card (name, context length, where its tokenizer is) with its
endpoint. The router adopts the first model it sees (or the one ``--served-model-name`` names),
loads that model's tokenizer from the registered source (no weights, no torch), and from then on
routes only to workers of that model. The model is *ready*, and listed by ``/v1/models`` and
the KServe readiness calls, once its tokenizer is loaded and every tier the router's mode needs
(decode; prefill too when disaggregated) has a registered worker of it: a client that waits for
the listing never meets a 503 for want of a worker. A request for a known model that is not
ready is still served as well as the workers registered allow (a disaggregated router whose
prefill tier is gone prefills on the decode tier).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping

from protocol.model_card import ModelCard
from router.errors import ModelNotReadyError, UnknownModelError
from router.worker_pool import WorkerPool
from runtime.discovery import WorkerInfo
from text.source import load_tokenizer
from text.tokenizer import TextTokenizer

log = logging.getLogger("tandem.router")


@dataclasses.dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int  # the smallest context of the workers serving it
    tokenizer: TextTokenizer
    created: int  # unix time the router adopted it


class ModelCatalog:
    """Follows the worker pools (``follow`` on every membership change) and answers what is
    served. ``name``: the only model to adopt ("" adopts the first one registered)."""

    def __init__(self, pools: Mapping[str, WorkerPool], needed_roles: tuple[str, ...], name: str = "") -> None:
        self.pools = pools
        self.needed_roles = needed_roles
        self.name = name
        self.model: ServedModel | None = None  # once its tokenizer is loaded
        self.error: str | None = None  # why the model cannot be served (yet)
        self._loading: asyncio.Task | None = None
        self._changed = asyncio.Event()

    @classmethod
    def for_mode(cls, mode: str, pools: Mapping[str, WorkerPool], name: str = "") -> ModelCatalog:
        roles = ("prefill", "decode") if mode == "disaggregated" else ("decode",)
        return cls(pools, roles, name)

    # ---- queries --------------------------------------------------------------------------
    def ready(self) -> bool:
        """The model is loaded and every tier the mode needs has a worker of it."""
        return self.model is not None and all(self.pools[role].members() for role in self.needed_roles)

    def listed(self) -> list[ServedModel]:
        """What ``/v1/models`` lists: the model, once ready."""
        return [self.model] if self.model is not None and self.ready() else []

    def resolve(self, name: str) -> ServedModel:
        """The served model a request names; UnknownModelError for another name, ModelNotReadyError
        while no model is loaded."""
        model = self.model
        if model is None:
            raise ModelNotReadyError(self.error or "no worker has registered a model yet")
        if name != model.name:
            raise UnknownModelError(f"the model {name!r} does not exist; this server serves {model.name!r}")
        return model

    def why_not_ready(self) -> str:
        if self.model is None:
            return self.error or ("loading the tokenizer" if self._loading else "no worker has registered a model")
        missing = [role for role in self.needed_roles if not self.pools[role].members()]
        return f"no {' and no '.join(missing)} worker of {self.model.name}" if missing else ""

    async def wait_changed(self, timeout_s: float) -> None:
        """Until the workers or the model change (at most ``timeout_s``)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()

    # ---- following registrations ---------------------------------------------------------------
    def follow(self) -> None:
        """The workers changed: adopt a model, or update the adopted one's context length."""
        self._changed.set()
        if self.model is not None:
            cards = self._cards(self.model.name)
            if cards:
                max_len = min(card.max_model_len for card in cards)
                if max_len != self.model.max_model_len:
                    self.model = dataclasses.replace(self.model, max_model_len=max_len)
            return
        if self._loading is not None:
            return
        card = next(iter(self._cards(self.name or None)), None)
        if card is None:
            return
        if card.tokenizer is None:
            self.error = f"model {card.name!r} was registered without a tokenizer: the router cannot serve it"
            log.error(self.error)
            return
        self._loading = asyncio.get_running_loop().create_task(self._adopt(card), name="load-tokenizer")

    async def _adopt(self, card: ModelCard) -> None:
        assert card.tokenizer is not None
        log.info("serving %s: loading its tokenizer from %s %s", card.name, card.tokenizer.kind, card.tokenizer.path)
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, card.tokenizer)
        except Exception as e:  # a path this host does not have: say so, try again on the next change
            self.error = f"cannot load the tokenizer of {card.name!r} from {card.tokenizer.path}: {e!r}"
            log.error(self.error)
            return
        finally:
            self._loading = None
        for pool in self.pools.values():
            pool.model_name = card.name
        cards = self._cards(card.name) or [card]
        self.model = ServedModel(card.name, min(c.max_model_len for c in cards), tokenizer, int(time.time()))
        self.error = None
        self._changed.set()
        log.info("serving %s (context %d tokens)", card.name, self.model.max_model_len)

    def _cards(self, name: str | None) -> list[ModelCard]:
        """The model cards of the registered workers (of model ``name``), decode tier first."""
        infos: list[WorkerInfo] = [info for role in ("decode", "prefill") if role in self.pools
                                   for info in self.pools[role].workers.workers.values()]
        return [info.model for info in infos if name is None or info.model.name == name]
