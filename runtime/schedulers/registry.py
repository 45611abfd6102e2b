"""Scheduler ids (``sched::euler``, or just ``euler``) → scheduler classes, on the project's shared ``Registry``.

A duplicate id is our bug and raises at import; an unknown id is the user's (``GenerateError`` listing the known).
"""

from __future__ import annotations

from typing import TypeVar

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


def make_scheduler(name: str, config: SchedulerConfig) -> Scheduler:
    """The scheduler registered as ``name`` (``euler`` or ``sched::euler``), built for ``config``."""
    return SCHEDULERS.get(name)(config)
