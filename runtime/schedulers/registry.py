"""Scheduler ids (``sched::euler``, or just ``euler``) → scheduler classes, on the project's shared ``Registry``.

A duplicate id is our bug and raises at import; an unknown id is the user's (``GenerateError`` listing the known).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pocketsd.errors import GenerateError
from pocketsd.registry import Registry

from .base import Scheduler
from .config import SchedulerConfig

SCHEDULERS: Registry[type[Scheduler]] = Registry("sched", GenerateError)

S = TypeVar("S", bound=type[Scheduler])


def register(cls: S) -> S:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    return SCHEDULERS.register(cls.name)(cls)


def available() -> list[str]:
    """The registered scheduler ids without namespace, sorted."""
    return SCHEDULERS.names()


def make_scheduler(name: str, config: SchedulerConfig | Mapping[str, Any]) -> Scheduler:
    """The scheduler registered as ``name`` (``euler`` or ``sched::euler``), built for ``config``: a model's
    ``scheduler_config.json`` as a mapping (read as the port's diffusers class reads it, its defaults filling the keys
    the file leaves out), or a ``SchedulerConfig`` taken as it is."""
    cls = SCHEDULERS.get(name)
    if not isinstance(config, SchedulerConfig):
        config = SchedulerConfig.from_dict(dict(config), cls.diffusers_class)
    return cls(config)
