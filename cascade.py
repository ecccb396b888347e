"""Cascade: run DAGs of Python functions on asyncio, and steer them while they run.

Write plain (sync or async) functions, decorate them with ``@task``, call them to build a
lazy graph, and ``run`` it. While it runs, pause a task type, cap its concurrency,
rate-limit it or let any such control expire on its own -- from code, from another
thread, or from another machine over MQTT::

    import cascade as cs

    @cs.task
    async def fetch(i): ...

    @cs.task
    def total(xs): return sum(xs)

    engine = cs.Engine()
    handle = engine.start(total(fetch.map(range(100))))
    engine.limit("task:fetch", 5)          # at most five fetches at a time, from now on
    print(handle.result())

One file, importable when copied alone; it needs only the Python standard library
(3.9+). MQTT clients (paho-mqtt, aiomqtt) and executors such as Dask are optional and
only used when you pass them in.

Copyright (c) 2026 The Cascade authors. Licensed under the MIT License (see LICENSE).
"""
# SPDX-License-Identifier: MIT
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import functools
import gc
import heapq
import inspect
import itertools
import json
import logging
import math
import operator
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Optional, Union

__version__ = "0.2.0.dev0"
__all__ = [
    # errors
    "CascadeError", "ConstraintError", "ParamError", "ResourceError",
    "DependencyMissingError", "NotKeptError", "ShellError", "Backoff",
    # authoring
    "task", "Task", "LazyResult", "MappedLazyResult", "unmapped", "Param", "Env",
    "resource", "Resource", "inject", "shell",
    # control plane
    "Constraint",
    # stores
    "SqliteStore", "RedisStore", "MISS",
    # pub/sub
    "LocalBroker", "MqttConnector", "Controller",
    # engine and events
    "Engine", "RunHandle", "Event", "RunStarted", "RunFinished", "TaskExecutionStarted",
    "TaskExecutionFinished", "TaskSkipped", "TaskCached", "TaskRetrying", "TaskBlocked",
    "ResourceAcquired", "ResourceReleased", "ConstraintApplied", "ConstraintRemoved",
    "ConstraintRejected", "CoordinatorOutage", "CoordinatorRecovered", "RedisCoordinator",
    # running, drawing
    "run", "run_async", "visualize", "main",
]

_log = logging.getLogger(__name__)
_MISSING = object()  # "no value given", where None is a value


# ===========================================================================
# Errors
# ===========================================================================

class CascadeError(Exception):
    """Base class of every error Cascade raises on its own account.

    A task's own exception is never wrapped: it propagates unchanged in type."""


class ConstraintError(CascadeError, ValueError):
    """An invalid control-plane call or constraint (scope, limit, rate, ttl, payload)."""


class ParamError(CascadeError, ValueError):
    """A run's params do not fit the graph's ``Param`` nodes (missing or unknown)."""


class ResourceError(CascadeError, LookupError):
    """A task injects a resource that is not registered with the engine or run."""


class DependencyMissingError(CascadeError):
    """The run target was skipped (a ``run_if`` was falsy upstream), so it has no value."""


class ShellError(CascadeError, subprocess.CalledProcessError):
    """``cs.shell(command)`` exited non-zero: a ``subprocess.CalledProcessError``
    (``returncode``, ``cmd``, ``stdout``, ``stderr``) whose message ends with the last
    lines of the command's stderr (CalledProcessError's own message leaves it out)."""

    def __str__(self):
        tail = _tail(self.stderr)
        return f"{super().__str__()} Its stderr ends: {tail}" if tail else super().__str__()


class Backoff(CascadeError):
    """Raised by a task body to say "too many requests: back off" (an HTTP 429 with its
    Retry-After). The engine pauses ``scope`` (default: the task's own, ``task:<name>``)
    for ``retry_after`` seconds (keeping a longer pause already there), and the task is
    retried once the pause lifts, holding no slot and no token meanwhile. It is not a
    failure: it takes none of the task's retry attempts. Every task of the scope waits
    too, which is the point: one 429 holds back the calls that would get one as well."""

    def __init__(self, retry_after: float, scope: Optional[str] = None) -> None:
        if (isinstance(retry_after, bool) or not isinstance(retry_after, (int, float))
                or not 0 < retry_after <= 1e10):
            raise TypeError(f"cs.Backoff(retry_after={retry_after!r:.80}): need a positive "
                            "number of seconds (a Retry-After header: float(value))")
        if scope is not None:
            _check_scope(scope)
        super().__init__(retry_after, scope)
        self.retry_after, self.scope = float(retry_after), scope

    def __str__(self):
        where = f" on {self.scope}" if self.scope else ""
        return f"back off{where} for {self.retry_after:g}s"


def _tail(text, lines=10, chars=1000):
    """The last ``lines`` lines of ``text`` (at most ``chars`` characters), stripped."""
    text = (text or "").strip()
    if not text:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return tail if len(tail) <= chars else "..." + tail[-chars:]


class NotKeptError(CascadeError):
    """A ``Controller`` verb did not see the broker keep what it published: the broker
    holds something else on the control topic ``topic`` (most often this user may not
    write it: an MQTT 3.1.1 broker drops such a publish silently, yet acknowledges it;
    or another operator wrote the topic just after), or the read-back itself was
    refused or got no answer. The message names the likely cause."""

    def __init__(self, message: str, topic: Optional[str] = None) -> None:
        super().__init__(message)
        self.topic = topic


# ===========================================================================
# Authoring: task, LazyResult, map, Param, Env, resource, shell
# ===========================================================================

# Types that can never contain a lazy value; checked first because it is the common case.
_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None)})
# Also control characters and bidi overrides: names are printed in terminals and logs.
_BAD_NAME = re.compile("[/+#\\s\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _check_name(name, what, error=ValueError):
    # Names end up as MQTT topic levels (cascade/constraints/task/<name>/pause), so the
    # characters that are special there are refused everywhere.
    if not isinstance(name, str) or not name or _BAD_NAME.search(name):
        raise error(f"{what} {name!r} must be a non-empty string without '/', '+', '#', "
                    "whitespace or control characters (it becomes an MQTT topic level)")
    return name


def _scan(value, found):
    """Append every lazy value inside ``value`` (through exact list, tuple and dict) to
    ``found``; return True when there was one."""
    t = type(value)
    if t in _PLAIN:
        return False
    if isinstance(value, LazyResult):
        found.append(value)
        return True
    if t is Task or t is _BoundTask:
        raise _task_not_called(value)
    hit = False
    if t is list or t is tuple:
        for v in value:
            if type(v) not in _PLAIN and _scan(v, found):
                hit = True
    elif t is dict:
        for v in value.values():
            if type(v) not in _PLAIN and _scan(v, found):
                hit = True
    return hit


def _task_not_called(task):
    return TypeError(f"the task {task.name!r} itself was passed as an argument; call it to "
                     f"pass its result: {task.name}(...) (or pass {task.name}.fn for the "
                     "plain function)")


_CONTAINERS = frozenset({list, tuple, dict})  # what _scan walks, so what _snapshot copies


def _snapshot(value):
    """``value`` with every exact list, tuple and dict inside copied (the containers
    ``_scan`` walks; the values in them are shared): an argument is taken as it is when
    the task is called, so a list changed afterwards (say, a lazy result appended to
    it) changes nothing in the graph."""
    t = type(value)
    if t is list:
        return [v if type(v) in _PLAIN else _snapshot(v) for v in value]
    if t is tuple:
        return tuple([v if type(v) in _PLAIN else _snapshot(v) for v in value])
    if t is dict:
        return {k: v if type(v) in _PLAIN else _snapshot(v) for k, v in value.items()}
    return value


def _resolve(value, nodes):
    """``value`` with every lazy value inside replaced by its result (see ``_scan``)."""
    t = type(value)
    if t in _PLAIN:
        return value
    if isinstance(value, LazyResult):
        return nodes[value].value
    if t is list:
        return [_resolve(v, nodes) for v in value]
    if t is tuple:
        return tuple([_resolve(v, nodes) for v in value])
    if t is dict:
        return {k: _resolve(v, nodes) for k, v in value.items()}
    return value


def _depends_on(node, target):
    """True when ``target`` is ``node`` or one of its ancestors."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if id(n) not in seen:
            seen.add(id(n))
            stack.extend(n.deps)
    return False


class _Inject:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"cs.inject({self.name!r})"


def inject(name: str) -> Any:
    """Mark a parameter default as "the value of resource ``name``"::

        @cs.task
        def save(row, db=cs.inject("db")): ...

    The resource is set up (once per run) before the first task that needs it starts.
    Passing the argument explicitly overrides the injection."""
    _check_name(name, "resource name")
    return _Inject(name)


def _injects_of(fn):
    return tuple((p.name, p.default.name) for p in inspect.signature(fn).parameters.values()
                 if isinstance(p.default, _Inject))


class unmapped:  # noqa: N801 -- reads like a function at the call site, as in Prefect
    """Wrap an argument of ``Task.map`` to pass it whole to every call."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"cs.unmapped({self.value!r})"


def _find_task(module, qualname):
    # Unpickling a Task: look it up by name, so a process pool gets the same task.
    obj = sys.modules.get(module) or __import__(module, fromlist=["_"])
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _by_name(task):
    """Is ``task`` itself what its module has at its qualname (so a worker that imports
    the module finds this task there)? Not for ``cs.task(math.factorial)`` or a task
    kept under another name than its function's: the name finds the function."""
    obj = sys.modules.get(task.__module__)
    try:
        for part in task.__qualname__.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return False
    return obj is task


def _key_getters(task, keys):
    """``@cs.task(keys={"customer": "customer_id"})``: ((key name, getter), ...), where
    getter(args, kwargs) is the key's value for a call: the named argument (its default
    if not passed), or what a function of the task's arguments returns."""
    call = f"@cs.task(keys=...) on {task.name!r}"
    if not isinstance(keys, dict) or len(keys) > 8:
        raise TypeError(f"{call}: need a dict of up to 8 keys, {{key name: argument name or "
                        f"function of the arguments}}, got {keys!r:.80}")
    params = task._sig.parameters
    getters = []
    for kname, how in keys.items():
        _check_name(kname, f"{call}: key name", TypeError)
        if "=" in kname:
            raise TypeError(f"{call}: key name {kname!r} must not contain '=' (scopes read "
                            "'key:<name>=<value>')")
        if callable(how):
            getters.append((kname, lambda args, kwargs, f=how: f(*args, **kwargs)))
            continue
        p = params.get(how) if isinstance(how, str) else None
        if p is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{call}: key {kname!r} = {how!r:.80}: need the name of one of "
                            f"the parameters {list(params)} of {task.name!r}, or a "
                            "function of its arguments")
        i = list(params).index(how) if p.kind is not p.KEYWORD_ONLY else math.inf
        getters.append((kname, functools.partial(_arg_of, name=how, i=i, d=p.default)))
    return tuple(getters)


def _arg_of(args, kwargs, name, i, d):
    """Argument ``name`` (position ``i``, default ``d``) of a call's args and kwargs."""
    return kwargs[name] if name in kwargs else args[i] if i < len(args) else d


def _key_values(task, args, kwargs):
    """The key values of a call of ``task`` (see _key_getters), as strings."""
    out = {}
    for kname, get in task.keys:
        try:
            v = get(args, kwargs)
        except Exception as exc:
            raise ValueError(f"the key function of {kname!r} of task {task.name!r} raised "
                             f"{exc!r:.200}") from exc
        v = v if type(v) is str else str(v)
        if len(v) > 200:
            raise ValueError(f"key {kname!r} of task {task.name!r} is {v[:40]!r}... "
                             f"({len(v)} characters); a key value must be at most 200 "
                             "(return a short id)")
        out[kname] = v
    return out


def _rebuild_task(fn, name, tags):
    # Unpickling a Task its name does not find (see Task.__reduce__).
    return Task(fn, name=name, tags=tags)


class Task:
    """A function made into a node type of workflows; see ``task``.

    Calling it binds the arguments at once (a mistake raises ``TypeError`` there, not
    when the graph runs) and returns a ``LazyResult``; nothing runs until ``run``.
    ``task.fn`` is the plain function."""

    def __init__(self, fn: Callable[..., Any], *, name: Optional[str] = None,
                 tags: Iterable[str] = (), cost: Any = 1, priority: float = 0,
                 keys: Optional[dict] = None) -> None:
        if isinstance(fn, Task):
            fn = fn.fn
        if isinstance(fn, (staticmethod, classmethod)):  # (a staticmethod is callable)
            kind = type(fn).__name__
            raise TypeError(f"@cs.task on a {kind}: put @{kind} above @cs.task (the task "
                            f"then makes the function, and @{kind} the method)")
        if not (type(cost) is int and cost == 1) and not callable(cost) and (  # (1: the default)
                isinstance(cost, bool) or not isinstance(cost, int) or not 0 <= cost <= _MAX_COUNT):
            raise TypeError(f"@cs.task(cost={cost!r:.80}): need an int from 0 to {_MAX_COUNT} "
                            "(the rate-limit tokens one start takes), or a function of the "
                            "task's arguments that returns one")
        self.cost = cost
        self.priority = priority and _check_priority(priority, "@cs.task(priority=...)")
        if not callable(fn):
            raise TypeError(f"@cs.task needs a function, got {type(fn).__name__}")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            kind = "an async generator" if inspect.isasyncgenfunction(fn) else "a generator"
            raise TypeError(f"@cs.task on {getattr(fn, '__qualname__', fn)!r}: it is {kind} "
                            "function, and a task's value is what its function returns; "
                            "return a list instead of yielding items (or map a task over "
                            "the items); for set-up/tear-down around a yield, use "
                            "@cs.resource")
        if isinstance(tags, str):
            tags = (tags,)
        self.fn = fn
        # its function's place, in the argument hash of its store keys (see _store_keys)
        self._where = (f"{getattr(fn, '__module__', None)}."
                       f"{getattr(fn, '__qualname__', None)}\0").encode("utf-8", "surrogatepass")
        self.name = _check_name(fn.__name__ if name is None else name, "task name")
        self.tags = tuple(_check_name(t, "tag") for t in tags)
        functools.update_wrapper(self, fn)
        self.is_async = inspect.iscoroutinefunction(fn)
        self._sig = inspect.signature(fn)
        self._injects = _injects_of(fn)
        ps = self._sig.parameters.values()
        # Calls that pass exactly the positional parameters skip Signature.bind (hot path).
        self._arity = (len(self._sig.parameters)
                       if all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty
                              for p in ps) else -1)
        self.keys = _key_getters(self, keys) if keys else ()
        # one key, an argument's: (key name, name, i, d) of _arg_of, read inline (see
        # _Run._unit_key)
        get = self.keys[0][1] if len(self.keys) == 1 else None
        self._key_arg = ((self.keys[0][0], get.keywords["name"], get.keywords["i"],
                          get.keywords["d"]) if type(get) is functools.partial else None)

    def _bind(self, call, args, kwargs):
        try:
            bound = self._sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{call}: {e}") from None
        return tuple((p, r) for p, r in self._injects if p not in bound.arguments)

    def __call__(self, *args: Any, **kwargs: Any) -> LazyResult:
        if kwargs or len(args) != self._arity:
            injects = self._bind(f"{self.name}()", args, kwargs)
        else:
            injects = ()
        return LazyResult(self, args, kwargs, injects)

    def __get__(self, obj, objtype=None):
        # A task defined in a class body is a method: ``obj.method(x)`` calls it with
        # ``self`` bound, as a function would (its name, tags and scopes stay the task's).
        if obj is None:
            return self
        return _BoundTask(self, obj)

    def map(self, *args: Any, **kwargs: Any) -> MappedLazyResult:
        """One call per item: ``fetch.map(urls)`` or ``fetch.map(url=urls, timeout=
        cs.unmapped(5))``. Each mapped argument is an iterable, or a lazy result that
        yields one; they are zipped (equal lengths). The value is the list of results in
        input order; an empty input gives ``[]``. Over a map, or a list of lazy results,
        of a length known when the graph is built, it runs item by item (item i starts
        once item i of its inputs is done; see _plan_pipe)."""
        injects = self._bind(f"{self.name}.map()", args, kwargs)
        lengths = {}
        margs = tuple(self._map_arg(f"#{i}", a, lengths) for i, a in enumerate(args))
        mkwargs = {k: self._map_arg(repr(k), v, lengths) for k, v in kwargs.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{self.name}.map(): mapped arguments have unequal lengths "
                             f"{lengths}; pass iterables of the same length")
        return MappedLazyResult(self, margs, mkwargs, injects)

    def _map_arg(self, label, value, lengths):
        if isinstance(value, unmapped):
            return (False, value.value)
        if isinstance(value, LazyResult):
            return (True, value)
        if type(value) is Task or type(value) is _BoundTask:
            raise TypeError(f"{self.name}.map(): map argument {label} is the task "
                            f"{value.name!r} itself; map over its results: "
                            f"{self.name}.map({value.name}.map(...)) or a list of "
                            f"{value.name}(...) calls")
        items = _map_items(f"{self.name}.map()", label, value)
        lengths[label] = len(items)
        return (True, items)

    def __reduce__(self):
        # pickle finds the function by name and would find this Task instead (the
        # decorator rebinds the name), so a Task pickles as "the task at module.qualname".
        # Where that name finds something else (cs.task(math.factorial), a task kept
        # under another name), it pickles as its function, name and tags (regression:
        # it unpickled as the plain function: "'function' object has no attribute 'fn'").
        if "<locals>" in self.__qualname__:
            raise TypeError(f"task {self.name!r} is defined inside a function and cannot be "
                            "pickled for a process executor; define it at module level")
        if _by_name(self):
            return (_find_task, (self.__module__, self.__qualname__))
        return (_rebuild_task, (self.fn, self.name, self.tags))

    def __repr__(self):
        kind = "async" if self.is_async else "sync"
        tags = f" tags={','.join(self.tags)}" if self.tags else ""
        return f"<Task {self.name} {kind}{tags}>"


class _BoundTask:
    """A task got from an instance (``obj.method``, see ``Task.__get__``): calling it or
    mapping it passes ``obj`` first, as a bound method does."""
    __slots__ = ("task", "obj")

    def __init__(self, task, obj):
        self.task, self.obj = task, obj

    @property
    def name(self):
        return self.task.name

    def __call__(self, *args: Any, **kwargs: Any) -> LazyResult:
        return self.task(self.obj, *args, **kwargs)

    def map(self, *args: Any, **kwargs: Any) -> MappedLazyResult:
        """``Task.map`` with the instance passed to every call."""
        return self.task.map(unmapped(self.obj), *args, **kwargs)

    def __repr__(self):
        return f"<bound {self.task!r} of {self.obj!r}>"


def _map_items(call, label, value):
    if isinstance(value, (str, bytes, bytearray, dict)):
        raise TypeError(f"{call}: map argument {label} is a {type(value).__name__}; wrap it "
                        "in cs.unmapped() to pass it to every call, or pass a list to map "
                        "over its items")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{call}: map argument {label} is not iterable "
                        f"({type(value).__name__}); wrap it in cs.unmapped() to pass it "
                        "to every call") from None


def task(fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None,
         tags: Iterable[str] = (), cost: Any = 1, priority: float = 0,
         keys: Optional[dict] = None) -> Any:
    """Decorator: ``@cs.task`` or ``@cs.task(name="api_call", tags=["io"])``.

    Works on sync functions (run in a thread pool: they may block) and async functions
    (run on the event loop). ``name`` and ``tags`` are what control scopes match:
    ``task:api_call``, ``tag:io``. A body that returns a lazy result has that graph run
    in the same run, and its value becomes the task's (recursion: see _Forward). In a
    class body it makes a method: ``obj.method(x)`` passes ``obj`` as ``self`` (the
    instance is then an argument like any other: a process pool or Dask must pickle
    it). A generator or async generator function is refused with ``TypeError`` (a
    task's value is what it returns).

    Passing a task itself where its result is meant (``size(fetch)``, also inside a
    list or dict, or to ``map``) raises ``TypeError`` when the graph is built.

    ``cost``: the tokens one start takes from each rate limit that matches it (1 by
    default; 0 takes none), or a function called with the task's arguments (those of
    the call, or of the map item) that returns that number: ``cost=lambda prompt:
    len(prompt) // 4`` makes "90,000 tokens a minute" a rate limit. Concurrency limits
    count starts, not cost. A start that costs more than a matching rate limit's burst
    could never start: it fails the run with ``ConstraintError`` instead of waiting.

    ``priority``: seconds of head start where its calls wait for admission (see
    ``LazyResult.with_priority``).

    ``keys``: values a call is known by, for per-key limits, fair sharing and scopes:
    ``keys={"customer": "customer_id"}`` (a parameter's name) or a function of the
    task's arguments (``{"customer": lambda order: order.customer}``). Each value is
    made a string; ``key:customer=acme`` scopes the calls with that value (globs on
    the value), and ``engine.limit(scope, 2, per="customer")`` limits each value on
    its own."""
    kw = dict(name=name, tags=tags, cost=cost, priority=priority, keys=keys)
    if fn is None:
        return lambda f: Task(f, **kw)
    return Task(fn, **kw)


_creation = itertools.count()
# The policies of a lazy result that change how its attempts wait, run and end
# (with_retry, with_timeout, return_exceptions, with_priority); one field, None for a
# plain call.
_Policy = collections.namedtuple("_Policy",
                                 "attempts delay backoff on jitter timeout catch priority cache")
_NO_POLICY = _Policy(attempts=1, delay=0.0, backoff=1.0, on=None, jitter=0.0, timeout=None,
                     catch=False, priority=None, cache=None)
# with_cache: (key: None | str | function, ttl: None | seconds, version: str)
_Cache = collections.namedtuple("_Cache", "key ttl version")
_MAX_PRIORITY = 1e7  # seconds (about 116 days): a priority is an offset on readiness time


def _check_priority(p, call):
    if (isinstance(p, bool) or not isinstance(p, (int, float))
            or not -_MAX_PRIORITY <= p <= _MAX_PRIORITY):
        raise ValueError(f"{call}: priority must be a number of seconds from "
                         f"{-_MAX_PRIORITY:.0e} to {_MAX_PRIORITY:.0e}, got {p!r:.80}")
    return float(p)


_NO_KWARGS = {}  # shared by every call without keyword arguments: never mutated


class LazyResult:
    """A node of the graph: the future value of one task call. Nothing runs until
    ``run``. Passing it to another task makes an edge (also inside list, tuple or dict
    arguments, which are copied when the task is called: changing such a list later
    changes nothing). Policies chain: ``fetch(u).with_retry(3).run_if(flag)``; each
    returns a new lazy result and leaves this one as it was."""

    __slots__ = ("task", "args", "kwargs", "injects", "deps", "lazy_args", "policy",
                 "condition", "amounts", "order")

    def __init__(self, task, args=(), kwargs=None, injects=()):
        self.order = next(_creation)  # task ids in a run follow the order of creation
        self.task = task
        self.injects = injects       # ((parameter, resource name), ...) not passed explicitly
        deps = copy = None
        for a in args:
            if type(a) not in _PLAIN:
                deps = deps or []
                _scan(a, deps)
                if type(a) in _CONTAINERS:
                    copy = True
        if kwargs:
            for v in kwargs.values():
                if type(v) not in _PLAIN:
                    deps = deps or []
                    _scan(v, deps)
                    if type(v) in _CONTAINERS:
                        copy = True
        if copy:  # the containers as they are now (see _snapshot)
            args = tuple([_snapshot(a) for a in args])
            if kwargs:
                kwargs = {k: _snapshot(v) for k, v in kwargs.items()}
        self.args = args
        self.kwargs = kwargs or _NO_KWARGS
        self.deps = deps or ()       # upstream nodes (may repeat)
        self.lazy_args = bool(deps)  # lazy values among the arguments
        self.policy = None           # a _Policy: retries, timeout, return_exceptions
        self.condition = _MISSING
        self.amounts = None          # {capacity name: int or lazy}

    @property
    def name(self):
        return self.task.name

    def _copy(self):
        """A new lazy result like this one, for a policy to change (policies never change
        the lazy result they are called on). It is a node of its own: numbered now
        (ids follow creation order), run on its own if both are in a run."""
        new = object.__new__(type(self))
        for cls in type(self).__mro__[:-1]:
            for slot in cls.__slots__:
                setattr(new, slot, getattr(self, slot))
        new.order = next(_creation)
        return new

    def with_retry(self, max_attempts: int = 3, delay: float = 0.0, backoff: float = 1.0, *,
                   on: Any = None, jitter: float = 0.0) -> LazyResult:
        """Retry on failure: ``max_attempts`` counts every attempt, the first included.
        Attempt k+1 starts ``delay * backoff**(k-1)`` seconds after attempt k failed; a
        task waiting out its delay holds no slot and is admitted again (a pause applies
        to its next attempt).

        ``on``: an exception class or a tuple of them; only a failure that is an instance
        of one is retried, any other fails at once (default: every failure is retried).
        ``jitter`` (0 to 1): each delay is multiplied by a factor drawn uniformly from
        ``[1 - jitter, 1 + jitter]``, so that many retries spread out (0: exact delays).
        The delay in ``TaskRetrying`` is the one drawn.

        Returns a new lazy result (see ``_copy``); this one is left unchanged, so
        ``x.with_retry(3)`` on a line of its own does nothing: use its value."""
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"with_retry(max_attempts={max_attempts!r}): need an int >= 1 "
                             "(the total number of attempts, the first included)")
        if not (isinstance(delay, (int, float)) and delay >= 0):
            raise ValueError(f"with_retry(delay={delay!r}): need a number of seconds >= 0")
        if not (isinstance(backoff, (int, float)) and backoff >= 1):
            raise ValueError(f"with_retry(backoff={backoff!r}): need a number >= 1")
        if on is not None:
            classes = on if type(on) is tuple else (on,)
            if not classes or not all(isinstance(c, type) and issubclass(c, BaseException)
                                      for c in classes):
                raise TypeError(f"with_retry(on={on!r}): need an exception class or a tuple "
                                "of them, e.g. on=(ConnectionError, TimeoutError)")
            on = classes
        if not (_is_number(jitter) and 0 <= jitter <= 1):
            raise ValueError(f"with_retry(jitter={jitter!r}): need a number from 0 to 1 (each "
                             "delay is multiplied by a random factor in [1 - jitter, "
                             "1 + jitter])")
        new = self._copy()
        new.policy = (new.policy or _NO_POLICY)._replace(
            attempts=max_attempts, delay=float(delay), backoff=float(backoff), on=on,
            jitter=float(jitter))
        return new

    def with_timeout(self, seconds: float) -> LazyResult:
        """Give each attempt ``seconds`` to finish; one that has not fails with the
        builtin ``TimeoutError`` (naming the task and the timeout). With ``with_retry``
        each attempt has its own deadline, and a timeout is a failure like any other
        (``on=TimeoutError`` retries it); on a map it applies to each item. The clock
        starts when the body begins (time spent waiting for admission does not count).

        - An async body is cancelled at the deadline (an async body that catches the
          cancellation and goes on fails when it returns).
        - A sync body cannot be interrupted (Python cannot stop a thread): the attempt
          fails at the deadline, and the body runs on in its thread, keeping that
          thread and its concurrency slots and capacities until it returns (so a limit
          is never exceeded: a retry of it waits for a slot like any other task). Its
          value is then dropped. The run counts it among the bodies it waits for when
          it ends (at most ``stop_grace``, see ``Engine``), so resources are not torn
          down under it.
        - On a remote executor (process pool, Dask) the clock starts when the body is
          handed over; at the deadline the attempt fails and its future is cancelled:
          a body that has not begun never will; on a process pool one that has runs on
          in its worker and keeps its slots until it returns (Dask cancels it where it
          runs, and its slots go back when Dask reports the cancellation).

        Returns a new lazy result; this one is left unchanged."""
        if not (_is_number(seconds) and 0 < seconds < float("inf")):
            raise ValueError(f"with_timeout(seconds={seconds!r}): need a number of seconds > 0")
        new = self._copy()
        new.policy = (new.policy or _NO_POLICY)._replace(timeout=float(seconds))
        return new

    def return_exceptions(self) -> LazyResult:
        """Make a failure of this task (or of any item of this map) its value: the
        exception object, once its retries are exhausted, instead of failing the run
        (as ``asyncio.gather(..., return_exceptions=True)``). Dependents receive the
        exception as the value; a map's list holds it at that item's place. The attempt
        is still reported as failed (``TaskExecutionFinished`` status "Failed" with the
        error, counted failed in ``status()``) and logged so, but the run goes on and may
        succeed. Only what the body raises is caught: a skip stays a skip, and a graph
        error (a map over a value that is not a list) still fails the run. Returns a new
        lazy result; this one is left unchanged."""
        new = self._copy()
        new.policy = (new.policy or _NO_POLICY)._replace(catch=True)
        return new

    def with_priority(self, priority: float) -> LazyResult:
        """Admission order where this call waits: it is admitted as if it had become
        ready ``priority`` seconds earlier (so 60 goes ahead of calls that became ready
        up to a minute after it; negative numbers go behind). Low priorities age and are
        never starved; equal ones stay first-in-first-out. Over the task's own
        ``@cs.task(priority=...)``. Returns a new lazy result."""
        new = self._copy()
        new.policy = (new.policy or _NO_POLICY)._replace(
            priority=_check_priority(priority, "with_priority()"))
        return new

    def with_cache(self, key: Union[str, Callable[..., Any], None] = None,
                   ttl: Optional[float] = None, version: Union[str, int] = "") -> LazyResult:
        """Keep this call's value (each item's, on a map) in the run's store (see
        ``Engine(store=...)``) and reuse it across runs and processes: a hit returns the
        stored value without running the body, reported as ``TaskCached`` and counted
        "cached" in ``status()``. A miss runs the body and stores what it returns (a
        failure is never stored; nor is a value the store cannot hold, with a warning).

        The key is the task's name, ``version`` (change it when the body changes what it
        returns) and, by default, a hash of the call's arguments: str, bytes, numbers,
        None, lists, tuples, dicts, sets, dataclasses of them, and any object that can be
        pickled (by its pickle: its class and attributes); arguments that cannot be
        pickled (a lock, a generator) fail the task with a TypeError that says to pass
        ``key``. ``key``: a function called with the call's arguments (each item's, on a
        map) that returns the part of the key that stands for them (a str), or a str for
        a plain call. ``ttl``: seconds a stored value is good for (None: for ever).
        Injected resources are not arguments and are not part of the key.

        Returns a new lazy result; this one is left unchanged."""
        if key is not None and not callable(key) and not isinstance(key, str):
            raise TypeError(f"with_cache(key={key!r}): need a str, or a function of the "
                            "call's arguments that returns one")
        if isinstance(key, str) and type(self) is MappedLazyResult:
            raise TypeError(f"with_cache(key={key!r}) on a map: every item would share one "
                            "key; pass a function of the item's arguments, e.g. "
                            "key=lambda url: url")
        if ttl is not None and not (_is_number(ttl) and 0 < ttl < float("inf")):
            raise ValueError(f"with_cache(ttl={ttl!r}): need seconds > 0, or None (for ever)")
        if isinstance(version, bool) or not isinstance(version, (str, int)):
            raise TypeError(f"with_cache(version={version!r}): need a str or an int")
        new = self._copy()
        new.policy = (new.policy or _NO_POLICY)._replace(
            cache=_Cache(key, None if ttl is None else float(ttl), str(version)))
        return new

    def run_if(self, condition: Any) -> LazyResult:
        """Run only when ``condition`` (a value, a lazy result or a Param) is truthy;
        otherwise the task is skipped, and so is everything that needs its value.
        Returns a new lazy result; this one is left unchanged (so ``p`` and
        ``p.run_if(c)`` in one run are two executions: ``p`` runs unconditionally)."""
        if type(condition) is Task or type(condition) is _BoundTask:  # always truthy
            raise _task_not_called(condition)
        new = self._copy()
        if isinstance(condition, LazyResult):
            new.deps = [*new.deps, condition]
        new.condition = condition
        return new

    def with_constraints(self, **amounts: Union[int, LazyResult]) -> LazyResult:
        """Hold ``amounts`` of the engine's named capacities while running, e.g.
        ``.with_constraints(gpu=1)`` with ``Engine(system_resources={"gpu": 2})``.
        Amounts may be lazy. On a map it applies to each item. Returns a new lazy
        result; this one is left unchanged."""
        new = self._copy()
        for k, v in amounts.items():
            if isinstance(v, LazyResult):
                new.deps = [*new.deps, v]
            elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"with_constraints({k}={v!r}): need an int >= 0 or a lazy "
                                 "result")
        new.amounts = dict(amounts)
        return new

    def __repr__(self):
        policy = self.policy or _NO_POLICY
        extra = "".join([
            f" upstream={len(self.deps)}" if self.deps else "",
            f" retry={policy.attempts}" if policy.attempts > 1 else "",
            f" timeout={policy.timeout:g}s" if policy.timeout else "",
            " return_exceptions" if policy.catch else "",
            f" priority={policy.priority:g}" if policy.priority is not None else "",
            " cached" if policy.cache is not None else "",
            " run_if" if self.condition is not _MISSING else "",
            f" constraints={self.amounts}" if self.amounts else "",
        ])
        return f"<{type(self).__name__} {self.name}{extra}>"

    # -- drawing (see _Drawing): the graph as the run would build it
    def to_dot(self, collapse: Optional[bool] = None) -> str:
        """The graph as Graphviz DOT text: a node per call (a map is one node, labelled
        with its size when known: ``fetch ×1,000``), edges from each dependency to its
        dependant. ``collapse``: see ``cs.visualize``."""
        return _Drawing(self, None, collapse).to_dot()

    def to_mermaid(self, collapse: Optional[bool] = None) -> str:
        """The graph as a Mermaid flowchart (as ``to_dot``)."""
        return _Drawing(self, None, collapse).to_mermaid()

    def to_svg(self, collapse: Optional[bool] = None) -> str:
        """The graph drawn as SVG, laid out by this file (no Graphviz): layers top-down,
        every edge pointing down. To colour it by state, draw a run's: ``handle.graph()``."""
        return _Drawing(self, None, collapse).to_svg()

    def _repr_svg_(self):  # a notebook shows the graph (the text repr stays as it is)
        return _Drawing(self)._repr_svg_()


class MappedLazyResult(LazyResult):
    """The lazy list of results of ``Task.map``: one task execution per item (own events,
    retries and constraint slots); the map itself is structural and never holds a slot.
    ``args``/``kwargs`` hold ``(mapped, value)`` pairs."""

    __slots__ = ()

    def __init__(self, task, margs, mkwargs, injects):
        super().__init__(task, tuple(v for _, v in margs),
                         {k: v for k, (_, v) in mkwargs.items()}, injects)
        # the values as LazyResult took them (containers copied: see _snapshot)
        self.args = tuple([(m, v) for (m, _), v in zip(margs, self.args)])
        self.kwargs = {k: (mkwargs[k][0], v) for k, v in self.kwargs.items()}


class Param(LazyResult):
    """A run-time parameter, supplied by ``run(target, params={name: value})``. With no
    default it is required: a run missing it fails before any task starts."""

    __slots__ = ("param", "default")

    def __init__(self, name: str, default: Any = _MISSING) -> None:
        super().__init__(None)
        self.param = _check_name(name, "Param name")
        self.default = default

    @property
    def name(self):
        return f"Param({self.param})"

    def __repr__(self):
        d = "" if self.default is _MISSING else f", default={self.default!r}"
        return f"cs.Param({self.param!r}{d})"


class Env(LazyResult):
    """The value of an environment variable, read when the run starts."""

    __slots__ = ("var", "default")

    def __init__(self, name: str, default: Optional[str] = None) -> None:
        super().__init__(None)
        self.var, self.default = name, default

    @property
    def name(self):
        return f"Env({self.var})"

    def __repr__(self):
        return f"cs.Env({self.var!r}, default={self.default!r})"


class _Gather(LazyResult):
    """The target of a run given as a list/tuple/dict of lazy results."""
    __slots__ = ()

    @property
    def name(self):
        return "<targets>"


class Resource:
    """A set-up/tear-down pair written as a generator (like a pytest fixture): code before
    ``yield`` sets up, the yielded value is injected, code after it tears down. See
    ``resource``."""

    def __init__(self, fn, *, name=None, same_thread=False):
        if not (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)):
            raise TypeError(f"@cs.resource needs a generator function (sync or async) with "
                            f"one `yield value` between set-up and tear-down; got {fn!r}")
        self.fn = fn
        self.name = _check_name(fn.__name__ if name is None else name, "resource name")
        self.is_async = inspect.isasyncgenfunction(fn)
        if same_thread and self.is_async:
            raise TypeError(f"@cs.resource(same_thread=True) on async generator {self.name!r}: "
                            "an async resource lives on the event loop's one thread already; "
                            "leave same_thread out, or make it a sync generator")
        self.same_thread = bool(same_thread)
        self.injects = _injects_of(fn)
        functools.update_wrapper(self, fn)

    def __repr__(self):
        return (f"<Resource {self.name}{' async' if self.is_async else ''}"
                f"{' same_thread' if self.same_thread else ''}>")


def resource(fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None,
             same_thread: bool = False) -> Any:
    """Decorator for a resource generator: ``@cs.resource`` or ``@cs.resource(name=...)``.
    Register it with ``engine.register(r)`` or ``cs.run(..., resources=[r])``; tasks ask
    for it with ``db=cs.inject("db")``. Only resources the graph needs are set up, each
    before the first task that needs it; they are torn down in reverse order when the run
    ends, also after a failure or cancellation. A resource may inject resources.

    A sync resource's set-up and tear-down run in the engine's thread pool, maybe on two
    different threads, and each body that uses it on its own. ``same_thread=True`` is
    for values that must stay on the thread that made them (a ``sqlite3`` connection):
    the resource gets a thread of its own for the run, which runs its set-up, the body of
    every (sync) task that injects it, one at a time, in the order they are admitted,
    and its tear-down; so do resources that inject it. An async task cannot inject such
    a resource, nor can a task or resource need two of them (each is a ResourceError
    when the run starts)."""
    if fn is None:
        return lambda f: Resource(f, name=name, same_thread=same_thread)
    return Resource(fn, name=name, same_thread=same_thread)


def _shell(command, check=True):
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    if check and done.returncode:
        raise ShellError(done.returncode, command, done.stdout, done.stderr)
    if done.stderr.strip():  # (a failure carries it in its message instead)
        _log.info("shell command %r (exit status %d) wrote on stderr: %s", command,
                  done.returncode, _tail(done.stderr))
    return done.stdout


_shell_task = Task(_shell, name="shell")


def shell(command: Union[str, LazyResult], check: bool = True) -> LazyResult:
    """A task running ``command`` in a shell (in the thread pool); its value is stdout.
    With ``check=True`` a non-zero exit raises ``cs.ShellError``, a
    ``subprocess.CalledProcessError`` whose message ends with the tail of stderr.
    Otherwise stderr, when the command wrote any, is logged at INFO (its last lines).
    ``command`` may be a lazy result. Scopes see it as ``task:shell``."""
    return _shell_task(command, check)


# ===========================================================================
# Graph: the per-run state of each node
# ===========================================================================

class _Node:
    """Per-run state of one LazyResult (a LazyResult may be run many times).

    ``pending`` counts the upstream nodes not settled yet; it is -1 once the node itself
    has settled (done or skipped), which is how a graph returned by a task (see
    _Run._graft) tells a finished node of the run from one still to come."""
    __slots__ = ("lazy", "k", "seq", "pending", "dependents", "value", "skip", "left",
                 "key", "tally", "items", "cursor", "_id", "pipe", "out")

    def __init__(self, lazy):
        self.lazy = lazy
        self.k = 0              # it is the k-th call of its task in the run (its id)
        self.seq = 0            # readiness stamp (engine-wide order: FIFO admission)
        self.pending = 0        # upstream nodes not finished yet
        self.dependents = ()
        self.value = None
        self.skip = None        # reason string once skipped (or an upstream was)
        self.left = 0           # map items not finished yet
        self.key = None         # admission key (_Key)
        self.tally = None       # its task's per-state counts in the run (see _Unit)
        self.items = None       # a map's resolved columns while it is being expanded
        self.cursor = 0         # a map's next item to expand
        self._id = None
        self.pipe = None        # a pipelined map's _Pipe (see _plan_pipe)
        self.out = None         # a map feeding pipelined maps: those maps' nodes

    @property
    def id(self):
        """``name-k``: the k-th call of the task in the run, in creation order (derived
        when asked for: most runs never need most ids)."""
        if self._id is None:
            task = self.lazy.task
            self._id = self.lazy.name if task is None else f"{task.name}-{self.k}"
        return self._id


def _build_graph(target, tallies, counts):
    """Every node the target needs, with dependents, pending counts, ids and tallies
    (``tallies``: task -> per-state counts, filled in; ``counts``: task name -> calls
    numbered so far, for ids); returns ``(nodes, roots, special)``: roots are the nodes
    ready at once, special the nodes that are not a plain call (params, env, gathers,
    maps, calls that inject resources or ask for capacity).

    The cyclic garbage collector is paused meanwhile: everything made here stays alive,
    so a collection could free nothing, and the collections that a large graph's
    allocations trigger would each walk every object made so far (at 100,000 nodes
    that doubled the cost of building)."""
    return _without_gc(_build_nodes, target, tallies, counts)


def _without_gc(fn, *args):
    """``fn(*args)`` with the cyclic garbage collector paused (if it was on): for code
    that makes many objects which all stay alive, where a collection frees nothing."""
    if not gc.isenabled():
        return fn(*args)
    gc.disable()
    try:
        return fn(*args)
    finally:
        gc.enable()


def _build_nodes(target, tallies, counts, known=None, reached=None):
    """See _build_graph. With ``known`` (the nodes of a running graph, to which a task
    returned ``target``: see _Run._graft), only the lazy results not in ``known`` get
    nodes (returned); a node of ``known`` that has settled counts as a satisfied input
    (a skipped one skips its new dependents), any other gets the new dependents; each
    one reached is added to ``reached``."""
    nodes = {}
    stack = [target]
    pop, push = stack.pop, stack.extend
    while stack:
        lz = pop()
        if lz not in nodes:
            if known is not None and lz in known:
                reached.add(lz)
                continue
            nodes[lz] = _Node(lz)
            if lz.deps:
                push(lz.deps)
    lookup = nodes if known is None else collections.ChainMap(nodes, known)
    # In creation order, so that ids (name-1, name-2, ...) and the order in which
    # initially ready tasks are admitted follow the user's code (and an inner map's
    # length is known before the maps over it are planned).
    lengths = {}
    roots, special = [], []
    for node in sorted(nodes.values(), key=_node_order):
        lz = node.lazy
        if type(lz) is not LazyResult or lz.injects or lz.amounts or lz.policy is not None:
            special.append(node)
        task = lz.task
        if task is not None:
            node.k = counts[task.name] = counts.get(task.name, 0) + 1
            t = tallies.get(task)
            if t is None:
                t = tallies[task] = [0] * len(_STATE_NAMES)
            t[_PENDING] += 1
            node.tally = t
        deps = lz.deps
        if not deps:
            if type(lz) is MappedLazyResult:
                lengths[lz] = _known_length(lz, lengths)
            roots.append(node)
            continue
        if type(lz) is MappedLazyResult:
            n = lengths[lz] = _known_length(lz, lengths)
            whole = _plan_pipe(node, nodes, n) if n else None
            if whole is not None:  # pipelined: it waits whole for these only
                deps = whole
                if not deps:
                    roots.append(node)
                    continue
        if len(deps) > 1:
            deps = dict.fromkeys(deps)
        if known is None:
            for dep in deps:
                d = nodes[dep]
                if d.dependents:
                    d.dependents.append(node)
                else:  # exact size: most nodes have one dependent (append would make room for 4)
                    d.dependents = [node]
            node.pending = len(deps)
            continue
        pending = 0
        for dep in deps:  # a returned graph: some inputs may have settled already
            d = lookup[dep]
            if d.pending < 0:
                if d.skip is not None and node.skip is None:
                    node.skip = _needs(d, d.skip)
                continue
            if d.dependents:
                d.dependents.append(node)
            else:
                d.dependents = [node]
            pending += 1
        node.pending = pending
        if not pending:
            roots.append(node)
    return nodes, roots, special


def _needs(node, reason):
    """The skip reason that the dependents of ``node`` carry when it is skipped."""
    return reason if reason.startswith("needs ") else \
        f"needs {node.id}, which was skipped: {reason}"


# -- pipelined maps --------------------------------------------------------------
# A map over a map (or over a list of lazy results) whose length is known when the graph
# is built runs item by item: item i of the outer map is ready as soon as item i of each
# inner map, and every lazy result inside item i of each mapped list, is done (and the
# outer map itself is "open": its whole inputs, i.e. unmapped lazy arguments, a run_if
# condition and lazy constraint amounts, are done). Invariants:
# - the map's node waits (``pending``) for its whole inputs only; item i waits for
#   ``_Pipe.waits[i]`` inputs: item i of each inner map (whose node lists the map in its
#   ``out``) and each distinct lazy result inside item i of its lists (whose node has an
#   _Item among its dependents, one per (node, item));
# - waits[i] reaches 0 once, when item i's last input is done: its unit is made then (a
#   fresh readiness stamp), or, if the map is not open yet, when it opens (``held``, made
#   in input order with the map's stamp + index); ``_Pipe.made`` counts the units made;
# - a skip reaching any item skips the whole map (its items not made yet never run; those
#   made run to their end), as a skipped input skipped the whole map before pipelining;
#   so ``left`` of a skipped map never reaches 0 and it settles once, skipped.
# No object per item of a map over a map: a 1,000,000-item pipeline costs a list of
# counts more than two maps.
# Only inner maps made in the same graph build feed items (``out``): a map of a graph a
# task returned that maps over a map of the running graph waits for it whole.

def _known_length(lz, lengths):
    """The number of items of map ``lz`` if it is known without running anything (each
    mapped argument is a list, or a map of known length, and they agree), else None."""
    n = None
    for mapped, v in (*lz.args, *lz.kwargs.values()):
        if not mapped:
            continue
        m = len(v) if type(v) is list else lengths.get(v)
        if m is None or (n is not None and m != n):
            return None
        n = m
    return n or 0


class _Pipe:
    """A pipelined map's item-wise state (see above). ``cols`` are its columns as
    ``(kind, value)``: 0 an unmapped value (resolved when the map opens), 1 a list (item
    i resolved when it is made), 2 an inner map's node (item i is its value[i])."""
    __slots__ = ("n", "cols", "waits", "held", "open", "made")

    def __init__(self, n, cols, waits, held):
        self.n, self.cols, self.waits, self.held = n, cols, waits, held
        self.open = False
        self.made = 0


class _Item:
    """A lazy result inside item ``index`` of a pipelined map, among the dependents of its
    node: readied like a node when that settles (see _Run._settle_node), it counts one
    input of the item done (_Run._item_ready)."""
    __slots__ = ("node", "index", "pending", "skip", "seq")
    items = lazy = None  # as a node's, for the ready queue (_Run._pump)

    def __init__(self, node, index):
        self.node, self.index = node, index
        self.pending, self.skip, self.seq = 1, None, 0

    def ready(self, run):
        return run._item_ready(self)


def _plan_pipe(node, nodes, n):
    """Make map ``node`` (of ``n`` > 0 items, a known length) pipelined if one of its
    mapped columns has lazy items or is an inner map of this build (``nodes``); returns
    its whole inputs then (maybe empty), else None (it waits for every input, whole)."""
    lz = node.lazy
    whole, cols, item_wise = [], [], False
    for mapped, v in (*lz.args, *lz.kwargs.values()):
        if not mapped:
            if type(v) not in _PLAIN:
                _scan(v, whole)
            cols.append((0, v))
        elif type(v) is list:
            cols.append((1, v))
            item_wise = True  # (the map has lazy inputs: maybe in this list)
        elif v in nodes:
            cols.append((2, nodes[v]))
            item_wise = True
        else:
            return None
    if not item_wise:
        return None
    if isinstance(lz.condition, LazyResult):
        whole.append(lz.condition)
    for v in (lz.amounts or {}).values():
        if isinstance(v, LazyResult):
            whole.append(v)
    inner = list(dict.fromkeys(v for kind, v in cols if kind == 2))  # item i of each
    lists = [v for kind, v in cols if kind == 1]
    plan, found = [], []
    for i in range(n):
        srcs = []  # the nodes item i needs whole: the lazy results inside it
        for v in lists:
            x = v[i]
            if type(x) not in _PLAIN and _scan(x, found):
                for f in found:
                    if f not in nodes:  # of the running graph (a returned graph's map)
                        return None
                    srcs.append(nodes[f])
                found.clear()
        if len(srcs) > 1:
            srcs = list(dict.fromkeys(srcs))
        plan.append(srcs)
    held, waits = [], [len(inner)] * n
    for i, srcs in enumerate(plan):
        if srcs:
            waits[i] += len(srcs)
            for d in srcs:
                item = _Item(node, i)
                if d.dependents:
                    d.dependents.append(item)
                else:
                    d.dependents = [item]
        elif not inner:
            held.append(i)
    for d in inner:
        d.out = [node] if d.out is None else [*d.out, node]
    node.pipe = _Pipe(n, ([c for c in cols[:len(lz.args)]],
                          dict(zip(lz.kwargs, cols[len(lz.args):]))), waits, held)
    return whole


# -- graphs returned by tasks ------------------------------------------------------
# A task whose body returns a lazy result has that graph run in the same run (see
# _Run._returned_graph); its value becomes the task's value. Invariants:
# - the body's unit ends as any other (done: its slot is free, its events say so); its
#   node (or map item) is settled later, by a _Forward, when the returned graph's root is;
# - a _Forward stands among the dependents of that root, and nowhere else;
# - a returned graph's root that itself returns a graph hands its _Forward on to the new
#   root (no chain of waiting parents), and the nodes of its own graph, all settled,
#   leave the run's node table: tail recursion runs in constant memory and stack;
# - nodes of a returned graph that a later returned graph reaches are kept (``_kept``).

def _downstream(node):
    """The ids of the nodes that cannot settle before ``node`` has: its dependents, the
    pipelined maps over it, and the calls waiting for a graph one of those returned
    (regression: a returned graph that needed a node waiting for it only that way was
    taken, and the run waited forever)."""
    seen, stack = {id(node)}, [node]
    while stack:
        n = stack.pop()
        for d in (*n.dependents, *(n.out or ())):
            if type(d) is _Item or type(d) is _Forward:
                d = d.node
            if id(d) not in seen:
                seen.add(id(d))
                stack.append(d)
    return seen


class _Forward:
    """Settles ``node`` (item ``index`` of it, for a map's) with the value of ``root``,
    the root of a graph that one of its bodies returned; ``fresh``: that graph's lazy
    results that got nodes of their own, dropped from the run once it is done."""
    __slots__ = ("node", "index", "root", "fresh", "pending", "skip", "seq")
    items = lazy = None  # as a node's, for the ready queue (_Run._pump)

    def __init__(self, node, index):
        self.node, self.index = node, index
        self.root = self.fresh = None
        self.pending, self.skip, self.seq = 1, None, 0

    def ready(self, run):
        return run._forward_ready(self)


_node_order = operator.attrgetter("lazy.order")


# ===========================================================================
# Control plane: scopes, control types, constraints, the admission routine
# ===========================================================================
#
# Who owns what (one owner per concept):
# - a scope kind is one entry of _SCOPE_KINDS (how it matches an admission key);
# - a control type is one entry of _CONTROL_TYPES (its params and their validation, how
#   it reads, and the class of its state object, which owns can_take/take/give_back/
#   update and what status shows of it);
# - the admission routine (_ControlPlane._admit) is the only code that grants;
# - a unit's state changes only through _Unit's transition methods.

class _Key:
    """The admission key of a unit: what scopes are matched against. Units with one key
    wait in one queue, because the same constraints match all of them. Keys are interned
    per run (one object per task, or per task and capacity amounts), so a key compares
    and hashes by identity. The control plane caches on it what it needs (``needs``,
    ``takes``, as of constraint generation ``gen``)."""
    __slots__ = ("name", "tags", "run_id", "amounts", "window", "since", "cost", "per_unit",
                 "values", "base", "gen", "needs", "takes", "mgen", "matched")

    def __init__(self, name, tags, run_id, amounts=(), window=None, since=math.inf, cost=1,
                 per_unit=False, values=None, base=None):
        self.name = name          # the task's name: task:<name>
        self.tags = tags          # the task's tags: tag:<tag>
        self.run_id = run_id      # run:<run_id>
        self.amounts = amounts    # ((capacity, n), ...) of with_constraints, n > 0
        self.window = window      # the engine's _Window: a sync task on a remote executor
        self.since = since        # when its run started (monotonic): drains after it hold
        self.cost = cost          # the tokens a start takes from each rate limit (weighted)
        # its task's cost is a function, or it has keys: each unit gets the key of its
        # cost and key values (see _Run._unit_key)
        self.per_unit = per_unit
        self.values = values      # {key name: value} of a keyed call (see task(keys=))
        # the node's key this one is made from (_Run._unit_key): it matches the same
        # controls, bar those of 'key:' scopes and per-key parts (see _ControlPlane._needs)
        self.base = base
        self.gen = self.mgen = -1
        self.needs = self.takes = self.matched = ()

    def __repr__(self):
        return (f"<_Key {self.name} run={self.run_id}"
                f"{' ' + str(self.amounts) if self.amounts else ''}"
                f"{' ' + ' '.join(_keynames(self)) if self.values else ''}"
                f"{' window' if self.window is not None else ''}>")


# Scope kinds: kind -> (the names a key has of this kind in this project, the form, for
# errors). A scope `kind:pattern` matches a key if one of those names matches the
# pattern (globs allowed); `global` matches everything. A new scope kind is one entry.
_SCOPE_KINDS = {
    "task": (lambda key, project: (key.name,),
             "'task:<name>' (globs allowed: 'task:fetch_*')"),
    "tag": (lambda key, project: key.tags, "'tag:<tag>'"),
    "run": (lambda key, project: (key.run_id,), "'run:<run_id>'"),
    "project": (lambda key, project: (project,), "'project:<id>'"),
    "key": (lambda key, project: _keynames(key),
            "'key:<name>=<value>' (globs on the value: 'key:customer=a*')"),
}


def _keynames(key):
    """The names a keyed call has for 'key:' scopes: ``customer=acme``."""
    return [f"{k}={v}" for k, v in key.values.items()] if key.values else ()
_GLOB = re.compile(r"[*?\[]")  # a pattern without these matches its own name only


def _check_scope(scope):
    if scope == "global":
        return scope
    kind, sep, name = scope.partition(":") if isinstance(scope, str) else ("", "", "")
    if not sep or kind not in _SCOPE_KINDS:
        forms = ", ".join(form for _, form in _SCOPE_KINDS.values())
        raise ConstraintError(f"scope {scope!r} is not valid; use 'global', {forms}")
    _check_name(name, f"the name in scope {scope!r}", ConstraintError)
    if kind == "key" and ("=" not in name or not name.partition("=")[0]):
        raise ConstraintError(f"scope {scope!r} is not valid; use 'key:<name>=<value>' "
                              "('key:customer=acme'; globs on the value: 'key:customer=a*')")
    return scope


def _scope_matches(scope, key, project):
    """Does ``scope`` govern the units of admission key ``key`` in ``project``?"""
    if scope == "global":
        return True
    kind, _, pat = scope.partition(":")
    return any(fnmatch.fnmatchcase(v, pat) for v in _SCOPE_KINDS[kind][0](key, project))


_RATE = re.compile(r" *(\d+(?:\.\d*)?|\.\d+) */ *([smhd]) *")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MAX_WINDOWS = 8            # windows of one rate limit ("60/m" and "10000/d" are two)


# The largest numbers a control may carry: beyond them the arithmetic of limits, token
# buckets and timers would overflow or lose its meaning (regression: a burst of 10**400
# raised OverflowError inside the admission routine on every pass).
_MAX_COUNT = 10**9          # a limit, a burst
_MAX_RATE = 1e9             # starts per second
_MAX_SECONDS = 1e10         # a ttl (about 317 years)
_MAX_UNIX = 1e11            # an expires_at (the year 5138)


def _parse_rate(rate):
    """Starts per second from ``"10/s"``, ``"30/m"``, ``"2/h"``, ``"500/d"`` or a number
    per second."""
    per_s = None
    try:
        if isinstance(rate, (int, float)) and not isinstance(rate, bool):
            per_s = float(rate)
        elif isinstance(rate, str) and len(rate) <= 64 and rate.isprintable():
            m = _RATE.fullmatch(rate)
            if m:
                per_s = float(m.group(1)) / _PER[m.group(2)]
            else:
                try:
                    per_s = float(rate)
                except ValueError:
                    pass
    except OverflowError:  # an int too large for a float
        per_s = None
    if per_s is None or not (0 < per_s <= _MAX_RATE):
        raise ConstraintError(f"rate {rate!r:.80} is not valid; use 'N/s', 'N/m', 'N/h', 'N/d' or a "
                              f"positive number per second, at most {_MAX_RATE:.0e} (to stop "
                              "starts, use pause)")
    return per_s


def _is_number(x):
    """An int or float that is not a bool (JSON numbers off the wire)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(value, what, low, high=_MAX_COUNT):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConstraintError(f"{what} must be an int from {low} to {high}, got {value!r:.80}")
    return value


# -- state objects: what admission asks of an active control ------------------
# Each has the same small surface, like trio's CapacityLimiter: can_take(n, now) (may a
# unit needing n be granted now?), take(u, n) (reserve at grant), may_begin(u, n) and
# begin(u, n) (the start gate: may a granted unit's body begin now, and it does),
# give_back(u, n, began) (release; `began` is False for a grant that never started),
# update(params, now) (the control was replaced in place), retry_at(now, n) (when it may
# give n by itself; None: only on events), why(n) (the reason a waiter gives) and
# usage(now) (its status fields). `fifo`: whether a waiter held back on it holds it back
# for later waiters (no queue jumping); `gate`: whether the start gate re-checks it right
# before a body begins (for the start gate's fast path: none active, no lock needed);
# `takes`: whether a grant reserves something of it. _State has the defaults.

class _State:
    __slots__ = ("active",)  # (set False when its control is removed; limits read it)
    fifo, gate, takes, capacity = True, False, True, False
    since = None  # a drain's: the runs that started before it are exempt (see _needs)
    weighted = False  # a start takes its task's cost of it, not 1 (rate limits)
    keyed = False  # a per-key control: a unit needs the part of its key value (part())
    fair = None    # a fair limit's key name: its FIFO orders waiters by order()
    owner = None   # a per-key control's part: the _PerKey it belongs to
    shared = False  # a fleet's control, through the engine's coordinator (_Shared)

    def parts(self):
        """The states admission consults for this control (a per-key one: its parts)."""
        return (self,)

    def may_begin(self, u, n):
        return True

    def begin(self, u, n):
        pass

    def began_unlocked(self, u, n):
        pass

    def update(self, params, now):
        pass

    def retry_at(self, now, n):
        return None

    def usage(self, now):
        return {}


class _Pause(_State):
    """An active pause: every matched waiter is held; it takes nothing, and a paused
    waiter holds nothing back for others."""
    __slots__ = ("scope",)
    fifo, gate, takes = False, True, False

    def __init__(self, scope, params, now):
        self.scope = scope

    def can_take(self, n, now):
        return False

    def may_begin(self, u, n):
        return False

    def why(self, n):
        return f"pause on {self.scope}"

    def __repr__(self):
        return f"<_Pause {self.scope}>"


class _Drain(_Pause):
    """An active drain: held like a pause, but only the units of runs that started after
    it was put in force (``since``, the engine's monotonic clock then; see _needs);
    earlier runs carry on to their end. No start gate: a unit granted before the drain
    belongs to a run that started before it."""
    __slots__ = ("since",)
    gate = False

    def __init__(self, scope, params, now):
        self.scope, self.since = scope, now

    def why(self, n):
        return f"drain on {self.scope}"

    def __repr__(self):
        return f"<_Drain {self.scope}>"


_NONE = frozenset()


class _Limiter(_State):
    """Resizable capacity with trio's CapacityLimiter semantics: ``total`` slots of which
    ``borrowed`` are held. Shrinking never evicts; growing admits from spare capacity.
    Serves concurrency limits and the engine's system resources (``capacity=True``).
    invariant: borrowed <= total, unless total was lowered while the slots were held.

    A concurrency limit is also re-checked at the start gate: ``running`` counts the
    holders whose body began, so after a limit is set or lowered, a unit granted earlier
    (a sync body queued in a busy pool) waits again rather than begin beside too many.
    invariant: running <= borrowed."""
    __slots__ = ("name", "total", "borrowed", "capacity", "running", "adopted", "maybe",
                 "fair", "weights", "vtime", "finish", "prune_at", "serial")
    gate = True  # (capacities are never applied, so never counted as gated)

    def __init__(self, name, total, capacity=False):
        self.name, self.total, self.borrowed, self.capacity = name, total, 0, capacity
        self.running = 0
        # (sets made when first needed: a per-key limit makes a limiter per value)
        self.adopted = _NONE  # holders that were running when it was set: counted
        self.maybe = _NONE    # holders that were granted when it was set: not yet counted
        self.active = True    # False once its control is removed: it gates nothing
        self.fair = None      # fair sharing across the values of this key (see order)

    @classmethod
    def control(cls, scope, params, now):
        st = cls(scope, params["limit"])
        st.update(params, now)
        return st

    def can_take(self, n, now):
        return self.borrowed + n <= self.total

    def take(self, u, n):
        self.borrowed += n
        if self.fair is not None:
            self.served(u.key, n)

    # Fair sharing (``fair="customer"``): start-time fair queueing. Each value of the
    # key has a virtual finish time, advanced by 1/weight for each grant; a waiter's
    # place in this limit's FIFO is its value's tag, max(vtime, finish), then, among
    # equal tags, values whose finish is behind vtime (or never served) first, then the
    # one served longest ago, then readiness (order). A value with many waiters is
    # pushed back by each grant; one that comes back idle takes the current vtime, so it
    # waits at most one round: round robin across values, ``weights`` grants each per
    # round. Values whose finish is behind vtime are forgotten (they are equivalent to
    # absent): memory is O(busy values). A value's place never moves back as time goes
    # on, so the tag a queue was parked with is never after that of a later queue of
    # its value: FIFO within a value holds (regression: a finish equal to vtime read as
    # behind it put a value's new queue before its own older one).
    def order(self, key, head):
        """The place in this limit's FIFO of a queue whose head became ready at
        ``head``: (tag, when its value was last served, head)."""
        f = self.finish.get(key.values.get(self.fair) if key.values else None)
        if f is not None and f[0] >= self.vtime:
            return (f[0], f[1], head)
        return (self.vtime, -1, head)

    def served(self, key, n):
        v = key.values.get(self.fair) if key.values else None
        finish = self.finish
        f = finish.get(v)
        t = f[0] if f is not None and f[0] > self.vtime else self.vtime
        self.vtime = t
        self.serial += 1
        finish[v] = (t + n / self.weights.get(v, 1), self.serial)
        if len(finish) > self.prune_at:
            for v in [v for v, f in finish.items() if f[0] < t]:
                del finish[v]
            self.prune_at = 2 * len(finish) + 64

    def adopt(self, u):
        """A new limit takes a unit that already holds a grant: a running one counts as
        running; a granted one passes this gate like any other (``maybe``: it may also
        have begun by the gate's lock-free path just then; see began_unlocked)."""
        self.borrowed += 1
        if u.state == _RUNNING:
            self.running += 1
            if self.adopted is _NONE:
                self.adopted = set()
            self.adopted.add(u)
        else:
            if self.maybe is _NONE:
                self.maybe = set()
            self.maybe.add(u)

    def may_begin(self, u, n):
        # the other adopted units that may have begun unlocked count as running: one
        # may be between its lock-free begin and began_unlocked (review: two began
        # under a new limit of 1)
        maybe = len(self.maybe) - (u in self.maybe) if self.maybe else 0
        return self.capacity or not self.active or self.running + maybe + n <= self.total

    def begin(self, u, n):
        if not self.capacity:
            if self.maybe:
                self.maybe.discard(u)
            self.running += n

    def began_unlocked(self, u, n):
        # it began by the lock-free path while this limit was being set: count it now
        if u in self.maybe:
            self.maybe.discard(u)
            self.running += n
            if self.adopted is _NONE:
                self.adopted = set()
            self.adopted.add(u)

    def give_back(self, u, n, began):
        self.borrowed -= n
        if u in self.maybe:
            self.maybe.discard(u)  # never counted
        elif u in self.adopted:
            self.adopted.discard(u)
            self.running -= n
        elif began and not self.capacity:
            self.running -= n

    def update(self, params, now):
        """Returns True when waiters' order changed (fair sharing set or lifted)."""
        self.total = params["limit"]
        fair = params.get("fair")
        if fair is None:
            self.weights = None
        else:
            self.weights = params.get("weights") or {}
            if fair != self.fair:
                self.vtime, self.finish, self.prune_at, self.serial = 0.0, {}, 64, 0
        changed, self.fair = fair != self.fair, fair
        return changed

    def why(self, n):
        if self.capacity:
            return (f"capacity {self.name} (needs {n}, {self.total - self.borrowed} of "
                    f"{self.total} free)")
        return (f"concurrency on {self.name} (limit {self.total}, {self.borrowed} running"
                f"{', fair by ' + self.fair if self.fair else ''})")

    def usage(self, now):
        if self.fair is None:
            return {"limit": self.total, "in_use": self.borrowed}
        return {"limit": self.total, "in_use": self.borrowed, "fair": self.fair}

    def __repr__(self):
        return f"<_Limiter {self.name} {self.borrowed}/{self.total}>"


class _Window(_Limiter):
    """An engine's submission window on an executor that runs sync bodies elsewhere (a
    process pool, a Dask cluster; see _Remote): a capacity every such body takes at its
    grant and gives back when its future completes, so at no instant are more than
    ``total`` handed over and unfinished. FIFO across the engine's runs, like any
    capacity; the start gate does not re-check it (a body that passes the gate is
    handed over at once). Resized, as a capacity, without evicting (``_ControlPlane.
    resize``): a Dask cluster's size is read afresh when each run starts."""
    __slots__ = ("executor",)

    def __init__(self, total, executor):
        super().__init__("window", total, capacity=True)
        self.executor = executor  # its name, for reasons and status

    def why(self, n):
        return f"the window of the {self.executor} ({self.total} handed over at a time)"

    def usage(self, now):
        return {"executor": self.executor, "size": self.total, "submitted": self.borrowed}

    def __repr__(self):
        return f"<_Window {self.executor} {self.borrowed}/{self.total}>"


class _Adaptive(_Limiter):
    """An adaptive concurrency limit (AIMD, as TCP's congestion window): a limit whose
    ``total`` follows the outcomes of the bodies it admits. Each listed error (``on``,
    by class name, subclasses too) or body slower than ``latency`` seconds multiplies it
    by ``factor`` (rounded down, never below ``min``); ``total`` clean bodies in a row
    since the last change add one (never above ``max``). Other failures change nothing.
    Lowering never evicts, raising admits at once, as for any limit.
    invariant: min <= total <= max."""
    __slots__ = ("low", "high", "factor", "latency", "on", "clean")

    def __init__(self, scope, params, now):
        super().__init__(scope, params.get("limit", params["max"]))
        self.clean = 0
        self.update(params, now)

    def update(self, params, now):
        self.low, self.high = params["min"], params["max"]
        self.factor, self.latency = params["factor"], params["latency"]
        self.on = frozenset(params["on"])
        self.total = min(self.high, max(self.low, params.get("limit", self.total)))

    def observe(self, exc, seconds):
        """A body it admitted ended; returns the new total if it changed, else None."""
        if (exc is not None and self.on and
                any(c.__name__ in self.on for c in type(exc).__mro__)) or (
                exc is None and self.latency is not None and seconds > self.latency):
            self.clean = 0
            new = max(self.low, int(self.total * self.factor))
        elif exc is None:
            self.clean += 1
            if self.clean < self.total or self.total >= self.high:
                return None
            self.clean = 0
            new = self.total + 1
        else:
            return None
        if new == self.total:
            return None
        self.total = new
        return new

    def why(self, n):
        return (f"adaptive limit on {self.name} (now {self.total} of {self.low}-{self.high}, "
                f"{self.borrowed} running)")

    def usage(self, now):
        return {"limit": self.total, "in_use": self.borrowed, "min": self.low,
                "max": self.high}

    def __repr__(self):
        return f"<_Adaptive {self.name} {self.borrowed}/{self.total} [{self.low}, {self.high}]>"


class _Bucket(_State):
    """Token buckets, one a window: ``"60/m"`` gives 60/60 tokens a second, at most its
    burst. Each starts full, so with burst 1 starts are evenly spaced (as in Celery). A
    start takes a token from every window at grant (so each window's bound holds: starts
    <= burst + rate * elapsed); a grant that never started gets them back. One window
    is the common case; ``["60/m", "10000/d"]`` makes two (see _check_rate_limit)."""
    __slots__ = ("scope", "label", "windows", "stamp", "weighted")

    def __init__(self, scope, params, now):
        self.scope, self.stamp, self.windows = scope, now, ()
        self.update(params, now)

    def refill(self, now):
        if now > self.stamp:
            dt = now - self.stamp
            for w in self.windows:  # w = [rate per second, burst, tokens, unit]
                w[2] = min(w[1], w[2] + dt * w[0])
            self.stamp = now

    def can_take(self, n, now):
        self.refill(now)
        for w in self.windows:
            if w[2] < n:
                return False
        return True

    def take(self, u, n):
        for w in self.windows:
            w[2] -= n

    def give_back(self, u, n, began):
        if not began:
            for w in self.windows:
                w[2] = min(w[1], w[2] + n)

    def update(self, params, now):
        # Replacing keeps, for each window of the same unit, at most the new burst of
        # tokens; a window that is new starts full.
        self.refill(now)
        rates, bursts = params["rate"], params["burst"]
        if type(rates) is not list:
            rates, bursts = [rates], [bursts]
        old = {w[3]: w[2] for w in self.windows}
        windows = []
        for rate, burst in zip(rates, bursts):
            unit = _rate_unit(rate)
            windows.append([_parse_rate(rate), burst, min(old.get(unit, burst), burst), unit])
        self.windows = windows
        self.label = params["rate"]  # as given: "10/s", 0.5, ["60/m", "10000/d"]
        self.weighted = params.get("weighted", True)  # a start takes its task's cost

    def retry_at(self, now, n):
        # when every window has n tokens again (each refills on its own)
        return now + max(max(0.0, n - w[2]) / w[0] for w in self.windows)

    def why(self, n):
        rates = self.label if type(self.label) is list else [self.label]
        short = [r for r, w in zip(rates, self.windows) if w[2] < n] or rates
        return f"rate_limit on {self.scope} ({_plus(short)})"

    def usage(self, now):
        self.refill(now)
        tokens = [round(w[2], 3) for w in self.windows]
        bursts = [w[1] for w in self.windows]
        one = len(tokens) == 1
        return {"rate": self.label, "burst": bursts[0] if one else bursts,
                "tokens": tokens[0] if one else tokens}

    def __repr__(self):
        return "<_Bucket " + ", ".join(f"{w[0]:g}/s burst={w[1]} tokens={w[2]:.2f}"
                                       for w in self.windows) + ">"


class _KeyLimiter(_Limiter):
    """The concurrency limit of one value of a per-key limit (see _PerKey); ``name`` is
    the control's scope."""
    __slots__ = ("owner", "value")

    def idle(self, now):
        return not self.borrowed

    def why(self, n):
        return (f"concurrency on {self.name} for {self.owner.per}={self.value} (limit "
                f"{self.total}, {self.borrowed} running)")

    def __repr__(self):
        return f"<_KeyLimiter {self.name} {self.owner.per}={self.value} {self.borrowed}/{self.total}>"


class _KeyBucket(_Bucket):
    """The token buckets of one value of a per-key rate limit (see _PerKey)."""
    __slots__ = ("owner", "value")

    def idle(self, now):  # full again: a fresh one would be the same
        self.refill(now)
        return all(w[2] >= w[1] for w in self.windows)

    def why(self, n):
        return super().why(n).replace(" (", f" for {self.owner.per}={self.value} (", 1)


class _PerKey(_State):
    """A per-key control (``limit(scope, 2, per="customer")``): a concurrency limit
    (``kind`` "concurrency") or rate limit ("rate_limit") for each distinct value of the
    key ``per``, ``overrides`` giving some values their own. A unit needs the part of
    its key's value (``part``, cached in its key's needs), never this object itself; a
    task without the key ``per`` is not limited by it.

    Parts are made when first needed and forgotten when idle (nothing held, nothing
    parked on them, a bucket full again), by ``_ControlPlane._sweep`` once ``live``
    has doubled, so 100,000 customers over a run leave only the busy ones behind.
    invariant: at most one part per value is in use (every lookup goes through live,
    and a sweep invalidates the parts cached in keys' needs)."""
    __slots__ = ("scope", "kind", "per", "params", "live", "sweep_at", "gate", "pump",
                 "shared")
    keyed = True

    def __init__(self, scope, params, now, kind, pump=None):
        # pump: shared, each part is a shared state of its own value (_SharedKeyLimiter,
        # _SharedKeyBucket), attached to the engine's pump when made
        self.scope, self.kind, self.pump, self.shared = scope, kind, pump, pump is not None
        self.gate = kind == "concurrency"  # its parts are re-checked at the start gate
        self.live = {}      # value -> its part
        self.sweep_at = 64  # sweep idle parts when live grows beyond this
        self.active = True
        self.update(params, now)

    def _params(self, v):
        p = self.params
        o = p["overrides"].get(v)
        if self.kind == "concurrency":
            return {"limit": p["limit"] if o is None else o, "on_outage": p.get("on_outage")}
        if o is None:
            return p
        return {**o, "weighted": p.get("weighted", True), "on_outage": p.get("on_outage")}

    def part(self, key):
        """The state of ``key``'s value of the key (None: it has no such key)."""
        v = key.values.get(self.per) if key.values else None
        if v is None:
            return None
        st = self.live.get(v)
        if st is None:
            if self.pump is not None:
                cls = _SharedKeyLimiter if self.kind == "concurrency" else _SharedKeyBucket
                st = cls(self.scope, self._params(v), time.monotonic(), self.pump)
                st.owner, st.value = self, v
                self.pump.attach((self.scope, f"keyed_{self.kind}"), st,
                                 f"{self.scope}|{self.per}={v}")
            elif self.kind == "concurrency":
                o = self.params["overrides"].get(v)
                st = _KeyLimiter(self.scope, self.params["limit"] if o is None else o)
            else:
                st = _KeyBucket(self.scope, self._params(v), time.monotonic())
            st.owner, st.value = self, v
            self.live[v] = st
        return st

    def parts(self):
        return list(self.live.values())

    def update(self, params, now):
        self.per, self.params = params["per"], params
        for v, st in list(self.live.items()):
            st.update(self._params(v), now)

    def usage(self, now):
        parts = list(self.live.items())
        out = {"per": self.per, "keys": len(parts)}
        if self.kind == "concurrency":
            busiest = sorted(((st.borrowed, v) for v, st in parts if st.borrowed),
                             reverse=True)
            out.update(limit=self.params["limit"], in_use=sum(n for n, _ in busiest),
                       busiest={v: n for n, v in busiest[:5]})
        else:
            out.update(rate=self.params["rate"], burst=self.params["burst"])
        if self.pump is not None:
            down = [st.error for _, st in parts if st.down]
            out.update(shared=True, on_outage=self.params.get("on_outage")
                       or self.pump.on_outage, **({"coordinator": f"down: {down[0]}"}
                                                  if down else {}))
        return out

    def __repr__(self):
        return f"<_PerKey {self.kind} on {self.scope} per {self.per}: {len(self.live)} live>"


class _Ramp(_Bucket):
    """An active ramp (``resume(scope, ramp="10/s")``): a temporary rate limit that lifts
    itself once its backlog has gone through, i.e. when no unit it matches waits in the
    control plane any more (paused, drained or held back by anything). One rate, burst
    1, a token a start whatever its task's cost (so a costed task is never over its
    burst). Its own type, so it sits beside a user's rate_limit of the same scope and
    never touches it.

    Watched, never polled on the hot path: the control plane hands it to ``watch`` when
    it is put in force, and then it looks at its backlog on the clock thread at once (an
    engine with no backlog drops it at once), right after each start it grants
    (coalesced), and every CHECK_EVERY seconds while a backlog is left (it can also go
    without a start: a run that stops). The removal is the clock's, outside the lock,
    with ``only=`` the very constraint, as an expiry's: a newer ramp that replaced it
    stays. The check costs O(waiting queues), so at most once per start and per
    second."""
    __slots__ = ("cp", "tick", "soon")
    CHECK_EVERY = 1.0

    def __init__(self, scope, params, now):
        self.cp = self.tick = None
        self.soon = False  # a check is due at once
        super().__init__(scope, params, now)

    def update(self, params, now):
        super().update({"rate": params["rate"], "burst": 1, "weighted": False}, now)

    def take(self, u, n):
        for w in self.windows:
            w[2] -= n
        if not self.soon and self.cp is not None:
            self._check_soon()

    def watch(self, cp):  # cp's lock held: it is in force now
        self.cp = cp
        self._check_soon()

    def _check_soon(self):  # cp's lock held
        self.soon = True
        if self.tick is not None:
            self.cp.clock.cancel(self.tick)
        self.tick = self.cp.clock.call_at(0, self._check)

    def waiting(self):  # cp's lock held: the backlog, the units it matches that wait
        cp = self.cp
        return sum(len(q.waiters) for q in cp._queues.values()
                   if q.waiters and cp._matches(self.scope, q.key))

    def _check(self):  # on the clock thread
        cp, key = self.cp, (self.scope, "ramp")
        with cp.lock:
            self.soon, self.tick = False, None
            if cp._states.get(key) is not self:  # lifted or failed meanwhile
                return
            if self.waiting():
                self.tick = cp.clock.call_at(time.monotonic() + self.CHECK_EVERY, self._check)
                return
            # both layers' ramps go (the one in force last: one ConstraintRemoved)
            gone = sorted(cp._layers[key].values(), key=lambda c: c is cp.constraints[key])
        for c in gone:
            cp.remove(self.scope, "ramp", only=c, origin=c.origin)
        with cp.lock:  # a ramp that replaced it in place meanwhile is looked at afresh
            if cp._states.get(key) is self and not self.soon:
                self._check_soon()

    def why(self, n):
        return f"ramp on {self.scope} ({self.label})"

    def usage(self, now):
        use = super().usage(now)
        del use["burst"]
        use["waiting"] = self.waiting() if self.cp is not None else 0
        return use

    def __repr__(self):
        w = self.windows[0]
        return f"<_Ramp {self.scope} {w[0]:g}/s tokens={w[2]:.2f}>"


def _rate_unit(rate):
    """The window a rate is counted over, by its unit: ``"60/m"`` -> "m"; a plain
    number is per second."""
    m = _RATE.fullmatch(rate) if isinstance(rate, str) else None
    return m.group(2) if m else "s"


def _plus(x):
    """A window list as it reads in status and logs: ``60/m + 10000/d``."""
    return " + ".join(map(str, x)) if type(x) is list else str(x)


# -- shared controls: one budget for a fleet of engines, through a coordinator ----
# A shared limit or rate limit is a state like any other (admission stays _admit's):
# its can_take consults ``credit``, the fleet's grants this engine holds and has not
# used yet (permits of a limit, tokens of a rate). A unit held back on it waits holding
# nothing; the engine's pump (_Fleet, on its own thread) asks the coordinator for as
# many grants as units wait on it, in one round trip, adds the credit and wakes the
# state as a refill does. While the coordinator is down (``down``), ``on_outage`` says
# what it gives: "hold", nothing; "local", this engine's share of the fleet's budget
# (the budget over the engines last seen holding the control, at least 1).

class _Shared:
    """What the two shared states have in common (a mixin: the pump's fields)."""
    __slots__ = ()
    shared = True

    def _init_shared(self, params, pump):
        self.pump, self.credit = pump, 0
        # its name at the coordinator: the engine's and a serial (a control replaced by
        # a new state of the same key never drops the new one's holdings as it leaves)
        self.member = f"{pump.me}/{next(pump.serial)}"
        self.asked = 0           # what its ticket at the coordinator still asks for
        self.synced = 0          # permits the coordinator counts ours, as last told
        self.returned = 0        # tokens to give back to the fleet's bucket
        self.renew_at = 0.0      # when the pump next renews this engine's lease
        self.retry = 0.0         # when the pump may ask again (a rate's next token)
        self.granted_at = 0.0    # when the unused credit was granted
        self.down = False        # the coordinator could not be reached
        self.error = None        # the last error from it
        self.used = None         # the fleet's usage, as of the last reply
        self.engines = 1         # engines holding this control, as of the last reply
        self.outage = params.get("on_outage") or pump.on_outage

    def fleet_usage(self):
        use = {"shared": True, "credit": self.credit, "engines": self.engines,
               "on_outage": self.outage}
        if self.used is not None:
            use["fleet_in_use" if self.kind == "c" else "fleet_tokens"] = self.used
        if self.down:
            use["coordinator"] = f"down: {self.error}"
        return use

    def short(self, n):  # lock held: no credit for n; the pump is told units wait
        self.pump.poke()
        return False

    def drop_credit(self):  # lock held: unused grants are not to be used any more
        self.credit = 0

    def add_credit(self, grant, before, now):  # lock held: the coordinator granted these
        self.credit += grant


class _SharedLimiter(_Shared, _Limiter):
    """A concurrency limit shared by the fleet: at most ``total`` at once across every
    engine holding it. A start takes a permit of ``credit`` (a lease the coordinator
    granted this engine, renewed by the pump every lease/3 while held); ``inuse``
    counts the permits held by this engine's granted and running units (adopted ones
    too: they count against the fleet from when the limit is set). A give-back returns
    the permit to the fleet (the pump's next round trip). Locally it is also a limit
    of ``total``, re-checked at the start gate, as any limit."""
    __slots__ = ("pump", "credit", "inuse", "synced", "returned", "renew_at", "retry",
                 "granted_at", "down", "error", "used", "engines", "outage", "member",
                 "asked")
    kind = "c"

    def __init__(self, scope, params, now, pump):
        super().__init__(scope, params["limit"])
        self.inuse = 0
        self._init_shared(params, pump)
        self.update(params, now)

    def update(self, params, now):
        self.total = params["limit"]
        self.outage = params.get("on_outage") or self.pump.on_outage
        return False

    def share(self):
        return max(1, self.total // max(1, self.engines))

    def can_take(self, n, now):
        if self.borrowed + n > self.total:
            return False
        if self.down and self.credit < n:
            return self.outage == "local" and self.inuse + n <= self.share()
        return self.credit >= n or self.short(n)

    def take(self, u, n):
        self.borrowed += n
        self.inuse += n
        if self.credit >= n:
            self.credit -= n

    def adopt(self, u):
        super().adopt(u)
        self.inuse += 1  # told to the fleet as held: a new limit holds at once

    def give_back(self, u, n, began):
        super().give_back(u, n, began)
        self.inuse -= n
        if not began and not self.down:
            self.credit += n  # a grant that never started: its permit is credit again
        self.pump.poke()      # (the fleet gets it back, unless a waiter takes it first)

    def owned(self):
        return self.inuse + self.credit

    def want(self, demand):
        return max(0, min(demand, self.total - self.borrowed) - self.credit)

    def why(self, n):
        if self.down:
            return (f"shared concurrency on {self.name} (limit {self.total}, coordinator "
                    f"unreachable: {'local share ' + str(self.share()) if self.outage == 'local' else 'holding'})")
        fleet = "" if self.used is None else f", {self.used} in use across the fleet"
        return (f"shared concurrency on {self.name} (limit {self.total}, {self.borrowed} "
                f"running here{fleet})")

    def usage(self, now):
        return {"limit": self.total, "in_use": self.borrowed, **self.fleet_usage()}

    def __repr__(self):
        return f"<_SharedLimiter {self.name} {self.borrowed}/{self.total} credit={self.credit}>"


class _SharedBucket(_Shared, _State):
    """A rate limit shared by the fleet: one token bucket (``rate``, ``burst``) kept by
    the coordinator, so fleet starts <= burst + rate * elapsed. A start takes tokens
    of ``credit`` (granted by the fleet's bucket, not used yet) once they are due:
    ``due`` holds each one's time (monotonic, in order), as the bucket may hand out
    tokens it makes up to the pump's ``lead`` seconds later (see _FLEET_LUA), and the
    clock wakes the waiters when the next is due. A grant that never started gives
    its tokens back to credit, due at once; credit unused for a while goes back to
    the fleet's bucket. While the coordinator is down with on_outage="local": a bucket
    of its own at rate / engines (``local``: [tokens, stamp])."""
    __slots__ = ("scope", "label", "rate", "burst", "windows", "weighted", "pump", "credit",
                 "synced", "returned", "renew_at", "retry", "granted_at", "down", "error",
                 "used", "engines", "outage", "local", "member", "asked", "due")
    kind = "r"

    def __init__(self, scope, params, now, pump):
        self.scope, self.active = scope, True
        self._init_shared(params, pump)
        self.due = collections.deque()
        self.local = [0.0, now]
        self.update(params, now)

    def update(self, params, now):
        self.label = params["rate"]
        self.rate, self.burst = _parse_rate(params["rate"]), params["burst"]
        self.windows = [[self.rate, self.burst, 0, _rate_unit(params["rate"])]]  # (over_burst)
        self.weighted = params.get("weighted", True)
        self.outage = params.get("on_outage") or self.pump.on_outage
        return False

    def _refill_local(self, now):
        tokens, stamp = self.local
        rate = self.rate / max(1, self.engines)
        self.local = [min(self.burst, tokens + max(0.0, now - stamp) * rate), now]

    def can_take(self, n, now):
        if self.down and self.credit < n:
            if self.outage != "local":
                return False
            self._refill_local(now)
            return self.local[0] >= n
        if self.credit >= n:
            return self.due[n - 1] <= now
        return self.short(n)

    def take(self, u, n):
        if self.credit >= n:
            self.credit -= n
            for _ in range(n):
                self.due.popleft()
        else:
            self.local[0] -= n

    def give_back(self, u, n, began):
        if not began:
            self.credit += n
            self.due.extendleft((0.0,) * n)
            self.pump.poke()

    def drop_credit(self):
        self.credit = 0
        self.due.clear()

    def add_credit(self, grant, before, now):
        # the j-th token is due when the fleet's bucket makes it: (j - before) / rate
        # after ``now`` (our time of the coordinator's when it replied: _Fleet._clock)
        due, last = self.due, self.due[-1] if self.due else 0.0
        for j in range(1, grant + 1):
            last = max(last, now + (j - before) / self.rate if j > before else now)
            due.append(last)
        self.credit += grant

    def owned(self):
        return 0

    def want(self, demand):
        # at most a burst, or this engine's part of what the fleet makes in the pump's
        # lead if that is more (the bucket never holds more), so engines take turns: a
        # run of consecutive tokens each, which a process descheduled meanwhile begins
        # all at once, stays short
        cap = max(self.burst, math.ceil(self.rate * self.pump.lead / max(1, self.engines)))
        return max(0, min(demand, cap) - self.credit)

    def retry_at(self, now, n):
        if self.down and self.outage == "local":
            return now + max(0.0, n - self.local[0]) / (self.rate / max(1, self.engines))
        if self.credit >= n:
            return self.due[n - 1]  # its tokens' time
        return None  # the pump wakes it

    def why(self, n):
        if self.down:
            return (f"shared rate_limit on {self.scope} ({self.label}; coordinator "
                    f"unreachable: {'local share' if self.outage == 'local' else 'holding'})")
        return f"shared rate_limit on {self.scope} ({self.label} across the fleet)"

    def usage(self, now):
        return {"rate": self.label, "burst": self.burst, "tokens": self.credit,
                **self.fleet_usage()}

    def __repr__(self):
        return f"<_SharedBucket {self.scope} {self.label} credit={self.credit}>"


class _SharedKeyLimiter(_SharedLimiter):
    """The shared limit of one value of a shared per-key limit (see _PerKey): its own
    permits at the coordinator, under the name ``<scope>|<key>=<value>``."""
    __slots__ = ("owner", "value")

    def idle(self, now):  # (then forgotten by the sweep, and the pump lets it leave)
        return not self.borrowed and not self.credit and not self.inuse

    def why(self, n):
        return super().why(n).replace(" (", f" for {self.owner.per}={self.value} (", 1)


class _SharedKeyBucket(_SharedBucket):
    """The shared rate of one value of a shared per-key rate limit (see _PerKey)."""
    __slots__ = ("owner", "value")

    def idle(self, now):
        return not self.credit

    def why(self, n):
        return super().why(n).replace(" (", f" for {self.owner.per}={self.value} (", 1)


def _shared_state(c, now, pump):
    """The state of a shared control ``c`` (see _ControlPlane._install)."""
    if c.type == "concurrency":
        return _SharedLimiter(c.scope, c.params, now, pump)
    if c.type == "rate_limit":
        return _SharedBucket(c.scope, c.params, now, pump)
    return _PerKey(c.scope, c.params, now, c.type[len("keyed_"):], pump)


# -- control types: one entry each ------------------------------------------------
_MAX_KEYED = 1000  # overrides or weights of one control (values named one by one)


def _check_key_name(name, what):
    if not isinstance(name, str) or not name or "=" in name or _BAD_NAME.search(name):
        raise ConstraintError(f"{what} must be the name of a key tasks declare "
                              f"(@cs.task(keys={{'customer': ...}}): 'customer'), got "
                              f"{name!r:.80}")
    return name


def _check_by_value(raw, what, check):
    """``overrides`` / ``weights``: {key value: setting} (values as strings)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > _MAX_KEYED:
        raise ConstraintError(f"{what} must be an object of up to {_MAX_KEYED} key values, "
                              f"{{'acme': ...}}, got {raw!r:.80}")
    out = {}
    for v, x in raw.items():
        if isinstance(v, bool) or not isinstance(v, (str, int)) or len(str(v)) > 200:
            raise ConstraintError(f"{what}: {v!r:.80} is not a key value (a string)")
        out[str(v)] = check(x, f"{what}[{str(v)!r}]")
    return out


def _check_weight(w, what):
    if not _is_number(w) or not 0 < w <= 1e6:
        raise ConstraintError(f"{what} must be a positive number (grants per round), "
                              f"got {w!r:.80}")
    return w


_OUTAGES = ("hold", "local")  # what a shared control does while its coordinator is down


def _check_shared(raw, out):
    """``shared`` (true: one budget for every engine of the fleet, through the engine's
    coordinator) and ``on_outage`` (while the coordinator is unreachable: "hold" no new
    starts, "local" this engine's share); both left out of the params when not shared."""
    shared, outage = raw.get("shared", False), raw.get("on_outage")
    if shared is not True and shared is not False:
        raise ConstraintError(f"shared must be true or false, got {shared!r:.80}")
    if outage is not None and outage not in _OUTAGES:
        raise ConstraintError(f"on_outage must be 'hold' (no new starts while the "
                              f"coordinator is unreachable) or 'local' (this engine's share "
                              f"of the limit), got {outage!r:.80}")
    if not shared:
        if outage is not None:
            raise ConstraintError("on_outage needs shared=True (a local control has no "
                                  "coordinator to lose)")
        return out
    out["shared"] = True
    if outage is not None:
        out["on_outage"] = outage
    return out


def _check_concurrency(raw):
    if "limit" not in raw:
        raise ConstraintError("a concurrency constraint needs params {'limit': n}")
    out = _check_shared(raw, {"limit": _check_int(raw["limit"], "limit", 0)})
    fair, weights = raw.get("fair"), raw.get("weights")
    if fair is not None and out.get("shared"):
        raise ConstraintError("a shared limit takes no fair=/weights= (fair sharing is "
                              "per engine); set fair= on a local limit beside it")
    if fair is not None:
        out["fair"] = _check_key_name(fair, "fair")
        if weights:
            out["weights"] = _check_by_value(weights, "weights", _check_weight)
    elif weights:
        raise ConstraintError("weights need fair='<key name>' (they weigh its values)")
    return out


def _check_keyed_concurrency(raw):
    if "limit" not in raw or "per" not in raw:
        raise ConstraintError("a keyed_concurrency constraint needs params {'limit': n, "
                              "'per': '<key name>'} (and 'overrides': {value: n})")
    return _check_shared(raw, {
        "limit": _check_int(raw["limit"], "limit", 0),
        "per": _check_key_name(raw["per"], "per"),
        "overrides": _check_by_value(raw.get("overrides"), "overrides",
                                     lambda n, what: _check_int(n, what, 0))})


def _check_keyed_rate_limit(raw):
    if "per" not in raw:
        raise ConstraintError("a keyed_rate_limit constraint needs params {'rate': '10/s', "
                              "'per': '<key name>'} (and 'overrides': {value: rate})")
    out = _check_rate_limit({k: v for k, v in raw.items() if k not in ("per", "overrides")})

    def override(x, what):
        if isinstance(x, dict) and ("shared" in x or "on_outage" in x):
            raise ConstraintError(f"{what}: an override takes rate, burst and weighted "
                                  "(shared and on_outage are the control's)")
        try:
            x = _check_rate_limit(x if isinstance(x, dict) else {"rate": x})
        except ConstraintError as exc:
            raise ConstraintError(f"{what}: {exc}") from None
        if out.get("shared") and type(x["rate"]) is list:
            raise ConstraintError(f"{what}: a shared rate_limit takes one rate per value "
                                  f"('100/s'), got {x['rate']!r:.80}")
        return x
    out["per"] = _check_key_name(raw["per"], "per")
    out["overrides"] = _check_by_value(raw.get("overrides"), "overrides", override)
    return out


def _check_adaptive(raw):
    low = _check_int(raw.get("min", 1), "min", 1)
    if "max" not in raw:
        raise ConstraintError("an adaptive constraint needs params {'max': n} (and 'min', "
                              "'factor', 'latency', 'on', 'limit' if you like)")
    high = _check_int(raw["max"], "max", low)
    factor = raw.get("factor", 0.5)
    if not _is_number(factor) or not 0 < factor < 1:
        raise ConstraintError(f"factor must be a number between 0 and 1 (the multiplier on "
                              f"each error), got {factor!r:.80}")
    latency = raw.get("latency")
    if latency is not None and (not _is_number(latency) or not 0 < latency <= _MAX_SECONDS):
        raise ConstraintError(f"latency must be a positive number of seconds or null, got "
                              f"{latency!r:.80}")
    on = raw.get("on", [])
    if (not isinstance(on, list) or len(on) > 32
            or not all(isinstance(n, str) and n.isidentifier() for n in on)):
        raise ConstraintError(f"on must be a list of exception class names "
                              f"(['ConnectionError']), got {on!r:.80}")
    out = {"min": low, "max": high, "factor": float(factor),
           "latency": None if latency is None else float(latency), "on": list(on)}
    if "limit" in raw:  # where it starts (default max); events carry the current one
        out["limit"] = _check_int(raw["limit"], "limit", low, high)
    return out


def _adapt_params(low, high, on, latency, factor, limit):
    """The params of an adaptive control from ``adapt()``'s arguments: ``on`` as names."""
    if isinstance(on, (type, str)):
        on = (on,)
    names = []
    for x in on:
        if isinstance(x, type) and issubclass(x, BaseException):
            names.append(x.__name__)
        elif isinstance(x, str):
            names.append(x)
        else:
            raise ConstraintError(f"adapt(on=...): need exception classes (or their names), "
                                  f"got {x!r:.80}")
    params = {"min": low, "max": high, "on": names, "latency": latency, "factor": factor}
    if limit is not None:
        params["limit"] = limit
    return params


def _check_rate_limit(raw):
    """One rate (``"10/s"``; burst an int, 1 by default) or several windows, each bound
    holding (``["60/m", "10000/d"]``; burst a list, one per window). With several, the
    first window's burst defaults to 1, as for one rate (evenly spaced starts), and
    each further window's to its own count (a quota: 10000 a day, at any pace the other
    windows allow). A list of one rate is that rate."""
    if "rate" not in raw:
        raise ConstraintError("a rate_limit constraint needs params {'rate': '10/s'}")
    weighted = raw.get("weighted", True)
    if weighted is not True and weighted is not False:
        raise ConstraintError(f"weighted must be true or false, got {weighted!r:.80}")
    # (left out when true, the default: a start takes its task's cost; false: 1 a start)
    extra = {} if weighted else {"weighted": False}
    rate, burst = raw["rate"], raw.get("burst")
    if type(rate) in (list, tuple) and len(rate) == 1:
        rate = rate[0]
        if type(burst) in (list, tuple) and len(burst) == 1:
            burst = burst[0]
    _check_shared(raw, extra)
    if type(rate) not in (list, tuple):
        _parse_rate(rate)
        return {"rate": rate, "burst": 1 if burst is None else _check_int(burst, "burst", 1),
                **extra}
    if extra.get("shared"):
        raise ConstraintError(f"a shared rate_limit takes one rate ('100/s'), got "
                              f"{list(rate)!r:.80}; for several windows, set one shared "
                              "rate_limit and local ones beside it, or several scopes")
    if not 1 < len(rate) <= _MAX_WINDOWS:
        raise ConstraintError(f"a rate_limit takes one rate or a list of 2 to {_MAX_WINDOWS} "
                              f"windows ('60/m', '10000/d'), got {len(rate)}")
    units = []
    for r in rate:
        _parse_rate(r)
        unit = _rate_unit(r)
        if unit in units:
            raise ConstraintError(f"rate windows {list(rate)!r:.120} name the unit '/{unit}' "
                                  "twice; give each window its own unit (s, m, h, d)")
        units.append(unit)
    if burst is None:
        burst = [1] + [max(1, min(_MAX_COUNT, math.ceil(_parse_rate(r) * _PER[_rate_unit(r)])))
                       for r in rate[1:]]
    elif type(burst) not in (list, tuple) or len(burst) != len(rate):
        raise ConstraintError(f"burst {burst!r:.80} must be a list of one int per rate window "
                              f"({len(rate)}), or left out")
    return {"rate": list(rate), "burst": [_check_int(b, "burst", 1) for b in burst], **extra}


def _fair(p):
    if "fair" not in p:
        return ""
    w = p.get("weights")
    return f" fair by {p['fair']}" + (f" weights {w}" if w else "")


def _shared(p):
    if not p.get("shared"):
        return ""
    o = p.get("on_outage")
    return " shared" + (f" (on outage: {o})" if o else "")


def _fleet_row(row):
    """A status row's fleet part, for a shared control (see _Shared.fleet_usage)."""
    if not row.get("shared"):
        return ""
    parts = [f"{row['engines']} engine{'s' * (row['engines'] != 1)}"] if "engines" in row else []
    if "fleet_in_use" in row:
        parts.insert(0, f"{row['fleet_in_use']} in use fleet-wide")
    if row.get("coordinator"):
        parts.append(f"coordinator {row['coordinator']} ({row['on_outage']})")
    return " (shared" + (": " + ", ".join(parts) if parts else "") + ")"


def _overrides(p):
    o = p.get("overrides")
    if not o:
        return ""
    shown = ", ".join(f"{v}: {_plus(x['rate']) if isinstance(x, dict) else x}"
                      for v, x in itertools.islice(o.items(), 3))
    return f" ({shown}{', ...' if len(o) > 3 else ''})"


def _check_ramp(raw):
    """A ramp's params: one rate, as a rate_limit's (burst 1, a token a start)."""
    if "rate" not in raw:
        raise ConstraintError("a ramp constraint needs params {'rate': '10/s'} (the pace at "
                              "which a resumed backlog starts)")
    rate = raw["rate"]
    if type(rate) in (list, tuple):
        raise ConstraintError(f"a ramp takes one rate ('10/s'), got {rate!r:.80}; for "
                              "several windows, use rate_limit")
    _parse_rate(rate)
    return {"rate": rate}


class _ControlType:
    """Everything about one type of control: its name on the wire and in topics, its
    params (``check`` validates raw params and returns the
    normalised ones), how it reads (``describe``: in a sentence; ``setting``: the
    params alone, for tables; ``shows``: a status row's usage), and ``state``, which
    makes the state object admission consults (see _Pause/_Limiter/_Bucket).
    ``adopts_running``: a new one counts the matching tasks already running (a new
    limit must hold at once)."""
    __slots__ = ("name", "params", "check", "describe", "setting", "shows", "state",
                 "adopts_running")

    def __init__(self, name, params, check, describe, setting, shows, state,
                 adopts_running=False):
        self.name, self.params, self.check = name, params, check
        self.describe, self.setting, self.shows = describe, setting, shows
        self.state, self.adopts_running = state, adopts_running


_CONTROL_TYPES = {t.name: t for t in (
    _ControlType("pause", (), lambda raw: {}, lambda p: "pause", lambda p: "",
                 lambda row: f"{row['matching_running']} still running", _Pause),
    _ControlType("drain", (), lambda raw: {}, lambda p: "drain", lambda p: "",
                 lambda row: f"{row['matching_running']} still running", _Drain),
    _ControlType("concurrency", ("limit", "fair", "weights", "shared", "on_outage"),
                 _check_concurrency,
                 lambda p: f"limit {p['limit']}{_fair(p)}{_shared(p)}",
                 lambda p: f"limit {p['limit']}{_fair(p)}{_shared(p)}",
                 lambda row: f"{row['in_use']}/{row['limit']} in use{_fleet_row(row)}",
                 _Limiter.control,
                 adopts_running=True),
    _ControlType("keyed_concurrency", ("limit", "per", "overrides", "shared", "on_outage"),
                 _check_keyed_concurrency,
                 lambda p: f"limit {p['limit']} per {p['per']}{_overrides(p)}{_shared(p)}",
                 lambda p: f"limit {p['limit']} per {p['per']}{_overrides(p)}{_shared(p)}",
                 lambda row: (f"{row['in_use']} in use over {row['keys']} {row['per']} "
                              f"values (limit {row['limit']} each){_fleet_row(row)}"),
                 functools.partial(_PerKey, kind="concurrency"), adopts_running=True),
    _ControlType("adaptive", ("min", "max", "factor", "latency", "on", "limit"),
                 _check_adaptive,
                 lambda p: f"adaptive limit {p['min']}-{p['max']}",
                 lambda p: f"adaptive {p['min']}-{p['max']}",
                 lambda row: f"{row['in_use']}/{row['limit']} in use ({row['min']}-{row['max']})",
                 _Adaptive, adopts_running=True),
    _ControlType("rate_limit", ("rate", "burst", "weighted", "shared", "on_outage"),
                 _check_rate_limit,
                 lambda p: (f"rate {_plus(p['rate'])} burst {_plus(p['burst'])}"
                            f"{'' if p.get('weighted', True) else ' unweighted'}{_shared(p)}"),
                 lambda p: (f"{_plus(p['rate'])} burst {_plus(p['burst'])}"
                            f"{'' if p.get('weighted', True) else ' unweighted'}{_shared(p)}"),
                 lambda row: (f"{_plus(row['rate'])} burst {_plus(row['burst'])} "
                              f"tokens {_plus(row['tokens'])}{_fleet_row(row)}"),
                 _Bucket),
    _ControlType("keyed_rate_limit", ("rate", "burst", "weighted", "per", "overrides",
                                      "shared", "on_outage"),
                 _check_keyed_rate_limit,
                 lambda p: f"rate {_plus(p['rate'])} burst {_plus(p['burst'])} per {p['per']}"
                           f"{_overrides(p)}{_shared(p)}",
                 lambda p: f"{_plus(p['rate'])} burst {_plus(p['burst'])} per {p['per']}"
                           f"{_overrides(p)}{_shared(p)}",
                 lambda row: (f"{_plus(row['rate'])} per {row['per']}, {row['keys']} values "
                              f"busy{_fleet_row(row)}"),
                 functools.partial(_PerKey, kind="rate_limit")),
    _ControlType("ramp", ("rate",), _check_ramp,
                 lambda p: f"ramp {p['rate']}", lambda p: f"ramp {p['rate']}",
                 lambda row: (f"{row['rate']} tokens {row['tokens']}, "
                              f"{row['waiting']} waiting"),
                 _Ramp),
)}
_TYPES = tuple(_CONTROL_TYPES)
_TYPE_RANK = {t: i for i, t in enumerate(_TYPES)}


# The verbs' names of the types, accepted wherever a type is (`clear --type limit`).
_TYPE_ALIASES = {"limit": "concurrency", "rate": "rate_limit"}


def _check_type(type, call):
    type = _TYPE_ALIASES.get(type, type) if isinstance(type, str) else type
    if type is not None and type not in _CONTROL_TYPES:
        raise ConstraintError(f"{call}(type={type!r}): use one of {list(_TYPES)} (or "
                              f"{' / '.join(_TYPE_ALIASES)}), or None")
    return type


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One control: ``type`` is ``"pause"``, ``"concurrency"`` (params ``{"limit": n}``),
    ``"rate_limit"`` (params ``{"rate": "10/s", "burst": n}``), ``"ramp"`` (params
    ``{"rate": "10/s"}``: see ``Engine.resume``) or another of the control types (see the
    README's control plane); ``scope`` says which tasks it governs; ``expires_at`` is
    Unix time in seconds, or None. At most one constraint per (scope, type) is active: a
    new one replaces the old."""

    id: str
    scope: str
    type: str
    params: dict = dataclasses.field(default_factory=dict, hash=False)
    expires_at: float = None
    # which layer it is in force from: "local" (the engine's own verbs) or "broker" (a
    # retained control message); not part of the control itself
    origin: str = dataclasses.field(default="local", compare=False)

    @classmethod
    def make(cls, scope: str, type: str, params: Optional[dict] = None, *,
             ttl: Optional[float] = None, id: Optional[str] = None) -> Constraint:
        """A validated constraint; ``ttl`` seconds from now sets ``expires_at``."""
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
                                or not 0 < ttl <= _MAX_SECONDS):
            raise ConstraintError(f"ttl must be a positive number of seconds, at most "
                                  f"{_MAX_SECONDS:.0e}, got {ttl!r:.80}")
        return cls.from_dict({"id": id or os.urandom(8).hex(), "scope": scope, "type": type,
                              "params": params or {},
                              "expires_at": None if ttl is None else time.time() + ttl})

    @classmethod
    def from_dict(cls, data: Any) -> Constraint:
        """Validate a constraint as it arrives from the wire; raise ConstraintError."""
        if not isinstance(data, dict):
            raise ConstraintError(f"a constraint must be a JSON object, got "
                                  f"{type(data).__name__}")
        unknown = set(data) - {"id", "scope", "type", "params", "expires_at"}
        if unknown:
            raise ConstraintError(f"unknown constraint fields {sorted(unknown)}")
        kind = data.get("type")
        ctype = _CONTROL_TYPES.get(kind) if isinstance(kind, str) else None
        if ctype is None:
            raise ConstraintError(f"constraint type {kind!r} is not one of {list(_TYPES)}")
        scope = _check_scope(data.get("scope"))
        cid = data.get("id") or os.urandom(8).hex()
        if not isinstance(cid, str) or len(cid) > 200:
            raise ConstraintError(f"constraint id must be a short string, got {cid!r}")
        exp = data.get("expires_at")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, (int, float))
                                or not 0 <= exp < _MAX_UNIX):  # NaN fails this too
            raise ConstraintError(f"expires_at must be Unix seconds (0 to {_MAX_UNIX:.0e}) or "
                                  f"null, got {exp!r:.80}")
        raw = data.get("params")
        if raw is None:
            raw = {}
        elif not isinstance(raw, dict):  # (regression: [], 0 and "" passed as {})
            raise ConstraintError(f"params must be an object, got {type(raw).__name__}")
        if set(raw) - set(ctype.params):
            raise ConstraintError(f"unknown params {sorted(set(raw) - set(ctype.params))} for a "
                                  f"{kind} constraint (allowed: {sorted(ctype.params)})")
        return cls(cid, scope, kind, ctype.check(raw), None if exp is None else float(exp))

    def to_dict(self) -> dict:
        return {"id": self.id, "scope": self.scope, "type": self.type,
                "params": dict(self.params), "expires_at": self.expires_at}

    @property
    def topic(self):
        """The retained control topic of this (scope, type), under the default prefix."""
        return _control_topic(self.scope, self.type)

    def expires_in(self, now=None):
        """Seconds left, or None when it does not expire."""
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - (time.time() if now is None else now))

    def describe(self):
        left = self.expires_in()
        return (_what(self)
                + ("" if left is None else " (expired)" if left == 0 else
                   f" ({left:.1f}s left)"))

    def __repr__(self):
        return (f"<Constraint {self.describe()} id={self.id}"
                f"{' from the broker' if self.origin == 'broker' else ''}>")


def _shared_params(shared, on_outage, call):
    if shared is not True and shared is not False:
        raise ConstraintError(f"{call}(shared={shared!r:.80}): use True (one budget for the "
                              "fleet) or False")
    if not shared:
        if on_outage is not None:
            raise ConstraintError(f"{call}(on_outage=...) needs shared=True")
        return {}
    return {"shared": True, **({"on_outage": on_outage} if on_outage is not None else {})}


def _limit_control(scope, n, per, overrides, fair, weights, ttl, shared=False,
                   on_outage=None):
    """The constraint of ``limit()`` (the engine's and the Controller's): an ordinary
    concurrency limit (``fair=`` shares it across a key's values), or one per value of
    key ``per`` (type keyed_concurrency, beside an ordinary limit of the scope);
    ``shared``: one limit for the fleet (see RedisCoordinator)."""
    extra = _shared_params(shared, on_outage, "limit")
    if per is not None:
        if fair is not None or weights:
            raise ConstraintError("limit(per=...) takes no fair=/weights=: each value has "
                                  "its own limit already; to share one limit fairly, set "
                                  "fair= on a limit without per=")
        return Constraint.make(scope, "keyed_concurrency",
                               {"limit": n, "per": per, "overrides": overrides, **extra},
                               ttl=ttl)
    if overrides:
        raise ConstraintError("overrides= needs per='<key name>' (the key whose values "
                              "they name)")
    params = {"limit": n, **extra}
    if fair is not None or weights:
        params.update(fair=fair, weights=weights)
    return Constraint.make(scope, "concurrency", params, ttl=ttl)


def _rate_control(scope, rate, burst, weighted, per, overrides, ttl, shared=False,
                  on_outage=None):
    """The constraint of ``rate_limit()``: ordinary, or per value of key ``per`` (type
    keyed_rate_limit, beside an ordinary rate limit of the scope); ``shared``: one
    bucket for the fleet (see RedisCoordinator)."""
    extra = _shared_params(shared, on_outage, "rate_limit")
    params = {"rate": rate, "burst": burst, "weighted": weighted, **extra}
    if per is None:
        if overrides:
            raise ConstraintError("overrides= needs per='<key name>' (the key whose values "
                                  "they name)")
        return Constraint.make(scope, "rate_limit", params, ttl=ttl)
    return Constraint.make(scope, "keyed_rate_limit",
                           {**params, "per": per, "overrides": overrides}, ttl=ttl)


def _what(c):
    """A constraint in a few words, without its time left: "limit 3 on task:fetch"."""
    return f"{_CONTROL_TYPES[c.type].describe(c.params)} on {c.scope}"


_PREFIX = "cascade"  # the default topic prefix (see _check_prefix)
# The distribution's name on PyPI, for install hints: "cascade" there is another project.
# (The module and the command are "cascade".)
_DIST = "cascade-workflow"


def _source():
    """This process, as telemetry and presence name it: ``<host>-<pid>`` (a topic level)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _quiet_future(fut):
    """Done callback of a fire-and-forget publish: its failure is logged at DEBUG only."""
    if not fut.cancelled() and fut.exception() is not None:
        _log.debug("publish failed: %r", fut.exception())

# The shape of telemetry messages (see _RunLink.payloads and the README): 1.0 one event
# a message ("body"), 1.1 a list of them ("events"), 1.2 ENGINE_STOPPED with the run's
# status, and MapCountsEvent (telemetry="counts").
_TELEMETRY_V = "1.2"
_TELEMETRY_MODES = ("all", "counts", "runs", "off")  # Engine(telemetry=...)
# The states a map's items are counted in (telemetry="counts"), in this order
_COUNTED = ("BLOCKED", "RUNNING", "RETRYING", "COMPLETED", "FAILED", "CACHED")


def _check_prefix(prefix, what="prefix"):
    """A topic prefix: one or more topic levels, no wildcards, no empty level, not a
    ``$`` topic (``"cascade"``, ``"team-a/cascade"``). Every topic Cascade uses is under
    it, so deployments with different prefixes share a broker without seeing each
    other."""
    if (not isinstance(prefix, str) or not prefix or "\0" in prefix or "+" in prefix
            or "#" in prefix or prefix.startswith("$") or "" in prefix.split("/")):
        raise ValueError(f"{what}={prefix!r}: a topic prefix is one or more '/'-separated "
                         "levels without '+', '#', empty levels or a leading '$' (e.g. "
                         "'cascade' or 'team-a/cascade')")
    return prefix


def _prefix_of(connector):
    """The topic prefix of a connector (its ``prefix`` attribute; "cascade" if none)."""
    return _check_prefix(getattr(connector, "prefix", _PREFIX), f"{connector!r}.prefix")


def _control_topic(scope, kind, prefix=_PREFIX):
    # scope "task:api_call" -> "cascade/constraints/task/api_call/pause"
    return f"{prefix}/constraints/{scope.replace(':', '/', 1)}/{kind}"


def _parse_control_topic(topic, prefix=_PREFIX):
    """(scope, type) of a control topic under ``prefix``; ConstraintError if it is not
    one."""
    head = f"{prefix}/constraints/"
    parts = topic[len(head):].split("/") if topic.startswith(head) else ()
    if len(parts) == 2 and parts[0] == "global":
        scope, kind = "global", parts[1]
    elif len(parts) == 3:
        scope, kind = f"{parts[0]}:{parts[1]}", parts[2]
    else:
        raise ConstraintError(f"topic {topic!r} is not {head}<scope>/<type>")
    if kind not in _CONTROL_TYPES:
        raise ConstraintError(f"constraint type {kind!r} in topic {topic!r} is not one of "
                              f"{list(_TYPES)}")
    return _check_scope(scope), kind


def _read_control(topic, payload, prefix=_PREFIX):
    """What an engine makes of one message on a control topic: ``(key, constraint,
    None)``; ``(key, None, None)`` for the empty message (it removes the control); or,
    rejected, ``(key, _MISSING, reason)``, with key None when the topic is not a control
    topic at all. The one validator of control messages: engines (_Link.check) and
    Controller.retained (what ``cascade status`` shows as rejected) both use it, so the
    operator sees exactly what the engines would apply."""
    key = None
    try:
        scope, kind = key = _parse_control_topic(topic, prefix)
        if payload == "":
            return key, None, None
        if payload is None:  # (regression: a JSON null silently removed the control)
            raise ConstraintError("payload is null; to remove a control, publish an "
                                  "empty retained message")
        if isinstance(payload, (bytes, bytearray, str)):
            raise ConstraintError("payload over 64 KiB" if len(payload) > _MAX_PAYLOAD
                                  else "payload is not a JSON object")
        if len(json.dumps(payload, default=str)) > _MAX_PAYLOAD:
            raise ConstraintError("payload over 64 KiB")
        c = Constraint.from_dict(payload)
        if (c.scope, c.type) != (scope, kind):
            raise ConstraintError(f"payload is a {c.type} on {c.scope} but the topic is "
                                  f"for a {kind} on {scope}")
        return key, c, None
    except (ConstraintError, TypeError, ValueError, RecursionError) as exc:
        if isinstance(exc, RecursionError):
            exc = ConstraintError("payload nested too deeply")
        # capped: a reason quotes the payload, and a 60 KB id must not live on in
        # every warning and event (regression: 2,001 of them kept 120 MB)
        return key, _MISSING, _error_text(str(exc), "message")


# One-shot commands (not retained): Controller.cancel publishes {"scope", "id"} on
# <prefix>/commands/cancel; each engine's loop subscription that hears it cancels the
# runs on its loop (engine.cancel) and answers {"engine_id", "cancelled"} on
# <prefix>/acks/<id>/<engine id>/<its loop subscription's token>.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _cancel_topic(prefix):
    return f"{prefix}/commands/cancel"


def _read_cancel(payload):
    """What an engine makes of a message on the cancel topic: ``(scope, id, None)``,
    or, rejected, ``(None, None, reason)``."""
    if not isinstance(payload, dict):
        return None, None, ("payload over 64 KiB" if isinstance(payload, (str, bytes, bytearray))
                            and len(payload) > _MAX_PAYLOAD else "payload is not a JSON object")
    extra = sorted(map(str, set(payload) - {"scope", "id"}))
    if extra:
        return None, None, _error_text(f"unknown fields {extra}: a cancel has 'scope' and "
                                       "'id'", "message")
    cid = payload.get("id")
    if not isinstance(cid, str) or not _ID.fullmatch(cid):
        return None, None, _error_text(f"id {cid!r} is not 1 to 64 of A-Z a-z 0-9 _ -",
                                       "message")
    try:
        return _check_scope(payload.get("scope")), cid, None
    except ConstraintError as exc:
        return None, None, _error_text(str(exc), "message")


class _FastSwitch:
    """Who needs the GIL handed over quickly now: while anyone does, the interpreter's
    switch interval is FAST instead of its own (5 ms by default), and it is put back when
    nobody does (unless someone else changed it meanwhile).

    Why: a thread that wakes (the clock at a TTL deadline) waits for the GIL behind every
    thread that wants it, each holding it for up to one switch interval, so 16 CPU-bound
    sync bodies made TTL expiry 200 ms late at p50 and 780 ms at worst (guarantee 4 says
    50 ms whatever the scheduler does); at 0.2 ms it is 7 ms and 25 ms. It costs threads
    that compete for the GIL some throughput, so it is held only around a TTL deadline."""
    FAST = 0.0002

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = set()
        self._saved = None

    def hold(self, who, on):
        with self._lock:
            if on == (who in self._holders):
                return
            if on:
                self._holders.add(who)
                if len(self._holders) == 1 and sys.getswitchinterval() > self.FAST * 1.01:
                    self._saved = sys.getswitchinterval()
                    sys.setswitchinterval(self.FAST)
                return
            self._holders.discard(who)
            if not self._holders and self._saved is not None:
                if abs(sys.getswitchinterval() - self.FAST) < self.FAST * 0.01:
                    sys.setswitchinterval(self._saved)
                self._saved = None


_fast_switch = _FastSwitch()


class _Clock:
    """Timers for TTL expiry and token refill, on one thread per engine started on demand.

    It sleeps on a condition until the earliest deadline (never a periodic sweep), so an
    expiry fires on time whether or not the event loops are busy, and it exits when
    nothing is scheduled. Deadlines are ``time.monotonic()`` values.

    An ``urgent`` timer (a TTL expiry, guarantee 4) must also fire on time when other
    threads keep the GIL busy: from LEAD seconds before it until it has fired, the clock
    holds ``_fast_switch``, and for LEAD seconds after (the next one often follows: a
    TTL control renewed as a heartbeat). The clock wakes LEAD early to turn it on, and a
    thread that needs the GIL may itself wait up to about a second for it, hence a LEAD
    that long; a timer due sooner than LEAD turns it on at once, in the thread that sets
    it."""
    MAX_WAIT = 3600.0  # Condition.wait overflows past threading.TIMEOUT_MAX (regression:
    # a ttl of 1e10 killed the clock thread, and with it every later expiry and refill)
    LEAD = 1.5

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._heap = []
        self._urgent = []  # the urgent entries, also in _heap
        self._linger = 0.0  # held until then after an urgent timer fired (one often
        # follows: a TTL control renewed as a heartbeat)
        self._seq = itertools.count()
        self._thread = None

    def call_at(self, when, fn, urgent=False):
        entry = [when, next(self._seq), fn, urgent]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if urgent:
                heapq.heappush(self._urgent, entry)
                if when - time.monotonic() <= self.LEAD:
                    _fast_switch.hold(self, True)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="cascade-clock",
                                                daemon=True)
                self._thread.start()
            else:
                self._cond.notify()
        return entry

    def cancel(self, entry):
        entry[2] = None  # dropped when it reaches the top of the heap
        if entry[3]:  # the clock looks again: the switch interval may go back now
            with self._cond:
                self._cond.notify()

    def _main(self):
        try:
            while True:
                with self._cond:
                    while True:
                        heap, urgent = self._heap, self._urgent
                        while heap and heap[0][2] is None:
                            heapq.heappop(heap)
                        while urgent and urgent[0][2] is None:
                            heapq.heappop(urgent)
                        now = time.monotonic()
                        near = (bool(urgent) and urgent[0][0] - now <= self.LEAD
                                or now < self._linger)
                        _fast_switch.hold(self, near)
                        if not heap and not near:
                            return
                        delay = heap[0][0] - now if heap else self._linger - now
                        if delay <= 0:
                            entry = heapq.heappop(heap)
                            fn, entry[2] = entry[2], None  # (fired: dropped from _urgent)
                            if fn is None:  # cancelled just now (cancel takes no lock;
                                continue    # regression: "timer callback failed")
                            if entry[3]:
                                self._linger = now + self.LEAD
                            break
                        if near:  # wake to turn it off
                            if now < self._linger:
                                delay = min(delay, self._linger - now)
                        elif urgent:  # wake LEAD early to turn it on
                            delay = min(delay, urgent[0][0] - self.LEAD - now)
                        self._cond.wait(min(delay, self.MAX_WAIT))
                try:
                    fn()
                except Exception:  # a timer must never kill the clock
                    _log.exception("timer callback failed")
        finally:
            with self._cond:
                _fast_switch.hold(self, False)
                self._thread = None
                if self._heap:  # died with work left: start afresh
                    self._thread = threading.Thread(target=self._main, name="cascade-clock",
                                                    daemon=True)
                    self._thread.start()


def _reserve(u, takes):
    """(control-plane lock held) At its grant, ``u`` takes its amount of each state of
    ``takes`` and holds them (given back at release)."""
    u.held = hold = list(u.held)
    for st, n in takes:
        st.take(u, n)
        hold.append((st, n))


def _insort(waiters, u):
    """Put ``u`` in its place in a deque kept in ``seq`` order (from the end: rare)."""
    i = len(waiters)
    while i and waiters[i - 1].seq > u.seq:
        i -= 1
    waiters.insert(i, u)


class _Queue:
    """Waiting units with one admission key, in readiness order: the same constraints
    match all of them, so if the head cannot start, none can.

    Between admission passes a queue with waiters is either *pending* (``pending``: its
    entry in the control plane's ready heap, to be looked at by the next pass) or
    *parked* (``entries``: one in the ``_Parking`` of each state that holds its head
    back). ``left``: states whose parking it left since the last pass looked at it;
    ``why``: (state, amount) whose reason is shown for its waiters."""
    __slots__ = ("key", "loop", "waiters", "pending", "entries", "left", "why")

    def __init__(self, key, loop=None):
        self.key = key
        self.loop = loop  # the event loop of the run whose units wait here
        self.waiters = collections.deque()
        self.pending = None
        self.entries = ()
        self.left = ()
        self.why = None


class _Parking:
    """The queues held back on one state, oldest head first: a heap of entries
    [head seq, tiebreak, queue, this parking]. An entry is dropped by setting its queue
    to None; dropped entries are skipped at the top and compacted away when they are
    most of the heap, so a parking holds O(queues parked on it) entries."""
    __slots__ = ("state", "heap", "dropped")

    def __init__(self, state):
        self.state, self.heap, self.dropped = state, [], 0

    def top(self):
        heap = self.heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self.dropped -= 1
        return heap[0] if heap else None

    def drop(self, entry):
        entry[2] = None
        self.dropped += 1
        if self.dropped > 32 and 2 * self.dropped > len(self.heap):
            self.heap = [e for e in self.heap if e[2] is not None]
            heapq.heapify(self.heap)
            self.dropped = 0


class _ControlPlane:
    """Constraints, capacities and the one admission routine of an engine.

    Every decision "may this task start now" is made by ``_admit`` under ``self.lock``.
    It runs on enqueue, release, constraint changes, expiry, token refill and give-back,
    and grants while work waits and capacity exists, reserving slots and tokens at the
    moment of granting. Waiters hold nothing (all-or-nothing admission), so no
    combination of constraints can deadlock.

    Order: waiters are granted first-in-first-out by the time they became ready
    (``stamp``). FIFO is per limited resource: a waiter held back by a limiter, bucket or
    capacity holds that resource back for later waiters too (no queue jumping), but a
    paused waiter holds nothing back, so a pause never delays unrelated tasks.

    Cost: a queue whose head is held back is *parked* on each state that holds it back
    (on its pauses alone, if paused), and only a change that may free that state looks
    at it again: a give-back, a refill, a raised limit or a removed control *wakes* the
    state, which makes its oldest parked queue pending. So a pass costs O(log queues)
    per unit granted or queue woken, whatever the number of queues waiting (regression:
    sorting every live queue on each grant made 2,000 task names under one limit take
    2,000 times as long as without it).
    invariants (lock held, outside a pass):
    - every queue with waiters is pending or parked, never both;
    - a state's oldest parked queue is held back on the state itself, not only by FIFO
      behind an older one: a queue that leaves a parking wakes its state unless it came
      back as the oldest, and so does every change that may free the state.

    Granted units are launched by their run on its loop (``_Run.launch``); the body's
    thread calls ``gate`` right before the body begins, which is where a pause that
    arrived after the grant still stops it (guarantee 1)."""

    def __init__(self, capacities, project, notify):
        self.lock = threading.Lock()
        self.constraints = {}            # (scope, type) -> the Constraint in force
        self._layers = {}                # (scope, type) -> {origin: its Constraint}
        self.project = project
        self._notify = notify            # notify(applied: bool, constraint)
        self._states = {}                # (scope, type) -> its state object
        self._exact = {}                 # (kind, name) -> {(scope, type)} without globs
        self._globbed = {}               # (scope, type) -> (kind, pattern) with globs
        self._order = {}                 # (scope, type) -> when its state was made
        self._caps = {k: _Limiter(k, v, capacity=True) for k, v in capacities.items()}
        self._queues = {}                # _Key -> _Queue with waiters
        self._ready = []                 # heap of pending queues' entries
        self._parked = {}                # state -> its _Parking
        self._needers = {}               # capacity -> {queue waiting for it: amount}
        self._amounts = {}               # capacity -> Counter of those amounts
        self._tie = itertools.count()
        self._waiting = 0
        self._holders = set()            # units holding a grant (granted or running)
        self._gen = 0                    # bumped when constraints change
        self._gates = 0                  # active constraints the start gate re-checks
        self._npause = 0                 # of which pauses
        self._adaptive = 0               # active adaptive limits (they observe outcomes)
        self._keyscopes = 0              # active controls of 'key:' scopes
        self._keyed = []                 # active per-key controls (_PerKey)
        self._sweep_due = False          # one has doubled its parts: _sweep before a pass
        self._ttl = {}                   # ((scope, type), origin) -> clock entry of its expiry
        self._wakes = {}                 # state -> clock entry of its next refill
        self._failing = set()            # states whose code raised: removed soon
        self.fleet = None                # the engine's pump for shared controls (_Fleet)
        self._full = []                  # of the last _held_back: states without room
        self._refair = []                # fair limits to wake at the end of a pass (_grant)
        self.clock = _Clock()

    def stamp(self):
        """The readiness stamp: when things became ready (monotonic nanoseconds, shifted
        to leave room for a map's items, stamp + index, which keep input order), so a
        priority is an offset in time (see _Run._prioritized). Equal stamps are FIFO
        by the order they were queued in."""
        return time.monotonic_ns() << 20

    # -- constraints --------------------------------------------------------
    # Two layers (SPEC 5): for each (scope, type) the engine's own control ("local",
    # set by its verbs) and the broker's ("broker", a retained control message). The
    # broker's, while present and unexpired, is in force; without it the engine's own
    # is. Each layer's control expires by itself; an expired control changes nothing.
    def apply(self, c, origin="local"):
        """Set ``c`` as ``origin``'s control of its (scope, type). Returns the control
        that was in force before. One that arrived expired changes nothing (from the
        broker it means that the broker has none in force: the broker's layer is
        cleared, and the engine's own applies)."""
        if c.expires_at is not None and c.expires_at <= time.time():
            if origin == "broker":
                self.remove(c.scope, c.type, origin="broker")
            return None
        if c.origin != origin:
            c = dataclasses.replace(c, origin=origin)
        key = (c.scope, c.type)
        with self.lock:
            layer = self._layers.setdefault(key, {})
            layer[origin] = c
            self._forget_ttl((key, origin))
            if c.expires_at is not None:
                # both clocks read together (regression: `now`, read before the lock,
                # made a TTL expire early by however long the GIL or the lock took)
                deadline = time.monotonic() + (c.expires_at - time.time())
                self._ttl[(key, origin)] = self.clock.call_at(
                    deadline, functools.partial(self._expire, c), urgent=True)
            before = self.constraints.get(key)
            now_c = layer.get("broker") or layer["local"]
            changed = now_c is not before
            if changed:
                self._install(key, now_c)
            granted = self._admit() if self._ready else None
        if changed:  # (the event first, then the starts it allows: see remove)
            self._notify(True, now_c)
        self._dispatch(granted)
        return before

    def _install(self, key, c):  # lock held: make c the control in force of its key
        ctype = _CONTROL_TYPES[c.type]
        now = time.monotonic()
        # shared with a coordinator, else (none: see _Link.check) local
        shared = self.fleet is not None and c.params.get("shared", False)
        st = self._states.get(key)
        if st is not None and (st in self._failing or st.shared != shared):
            self._uninstall(key)  # (review) the other layer's control gets a state of its
            #                       own; so does a control that becomes shared, or local
        elif st is not None and st.keyed and st.per != c.params["per"]:
            # per another key: its parts count by the old key's values, so it is a new
            # control, which counts what already runs afresh (regression: limit 1 per
            # region, set over limit 1 per customer, let a sixth body start in a region
            # where five ran)
            self._uninstall(key)
        self.constraints[key] = c
        st = self._states.get(key)
        if st is None:
            if shared:
                st = _shared_state(c, now, self.fleet)
                if not st.keyed:  # (a per-key one's parts are attached as they are made)
                    self.fleet.attach(key, st)
            else:
                st = ctype.state(c.scope, c.params, now)
            self._states[key] = st
            self._index(key, True)
            self._gates += st.gate
            self._npause += st.__class__ is _Pause
            self._adaptive += st.__class__ is _Adaptive
            if st.keyed:
                self._keyed.append(st)
            if st.__class__ is _Ramp:  # it lifts itself once its backlog is through
                st.watch(self)
            if ctype.adopts_running:
                # A new limit counts what already runs in its scope, so that at no
                # instant more run than the limit (lowering never evicts).
                for u in self._holders:
                    if self._matches(c.scope, u.key):
                        part = st.part(u.key) if st.keyed else st
                        if part is not None:
                            part.adopt(u)
                            u.held = [*u.held, (part, 1)]
            # the queues it matches are looked at again: it may hold them back first
            # (a pause), and their reasons change
            for q in self._queues.values():
                if q.waiters and self._matches(c.scope, q.key):
                    self._pend(q)
        else:
            if st.update(c.params, now):  # waiters' order changed (fair): park afresh
                self._repend(st)
            for part in st.parts():
                self._cancel_wake(part)  # due at the old rate (regression: lost wake-up)
                self._wake(part)         # it may admit more now
        self._gen += 1

    def _uninstall(self, key):  # lock held: nothing is in force for key any more
        # Holders keep their reference and give back to a state nobody consults any
        # more; a later control on this scope counts afresh.
        del self.constraints[key]
        st = self._states.pop(key)
        self._index(key, False)
        self._failing.discard(st)
        self._gates -= st.gate
        self._npause -= st.__class__ is _Pause
        self._adaptive -= st.__class__ is _Adaptive
        if st.keyed:
            self._keyed.remove(st)
        st.active = False  # (a limit's: it gates nothing any more)
        for part in st.parts():
            part.active = False
            self._failing.discard(part)
            self._cancel_wake(part)
            self._repend(part)
        self._gen += 1

    def _repend(self, st):  # lock held: everything parked on st is looked at again
        parking = self._parked.pop(st, None)
        if parking is not None:
            for e in parking.heap:
                if e[2] is not None:
                    self._pend(e[2])

    def remove(self, scope, kind=None, only=None, origin="local"):
        """Remove ``origin``'s control of (scope, kind), or of every type of scope;
        returns the removed ones. The other layer's control of a key, if any, is then in
        force. With ``only``, remove it only if it is still that very constraint
        (checked under the same lock, so a newer one that replaced it stays)."""
        removed, events = [], []
        with self.lock:
            for t in ((kind,) if kind else _TYPES):
                key = (scope, t)
                layer = self._layers.get(key)
                c = layer.get(origin) if layer else None
                if c is None or (only is not None and c is not only):
                    continue
                del layer[origin]
                self._forget_ttl((key, origin))
                removed.append(c)
                before = self.constraints.get(key)
                now_c = layer.get("broker") or layer.get("local")
                if now_c is None:
                    del self._layers[key]
                    self._uninstall(key)
                    events.append((False, before))
                elif now_c is not before:
                    self._install(key, now_c)
                    events.append((True, now_c))
            granted = self._admit() if events and self._ready else None
        # The event first, then the starts it allows: a subscriber sees the control go
        # before any task it held starts (regression: a run that the expiry of its pause
        # let through ended before ConstraintRemoved was emitted).
        for applied, c in events:
            self._notify(applied, c)
        self._dispatch(granted)
        return removed

    def _index(self, key, add):  # lock held: the scope index that _matching reads
        scope = key[0]
        kind, _, pat = scope.partition(":")
        if kind == "key":
            self._keyscopes += 1 if add else -1
        if add:
            self._order[key] = next(self._tie)
        else:
            del self._order[key]
        if _GLOB.search(pat):
            if add:
                self._globbed[key] = (kind, pat)
            else:
                del self._globbed[key]
            return
        where = (kind, pat)  # ("global", "") for global
        if add:
            self._exact.setdefault(where, set()).add(key)
        else:
            keys = self._exact[where]
            keys.discard(key)
            if not keys:
                del self._exact[where]

    def _forget_ttl(self, key):  # lock held
        entry = self._ttl.pop(key, None)
        if entry:
            self.clock.cancel(entry)

    def _cancel_wake(self, st):  # lock held
        entry = self._wakes.pop(st, None)
        if entry:
            self.clock.cancel(entry)

    def _expire(self, c):
        self.remove(c.scope, c.type, only=c, origin=c.origin)

    def active(self):
        """The active constraints (expired ones the clock has not removed yet excluded)."""
        now = time.time()
        with self.lock:
            return [c for c in self.constraints.values()
                    if c.expires_at is None or c.expires_at > now]

    # -- admission ----------------------------------------------------------
    def _matches(self, scope, key):
        return _scope_matches(scope, key, self.project)

    def _matching(self, key):
        """The (scope, type) of every constraint that matches ``key``, in type order
        (their reasons are given in that order), then in the order they were made.
        Cost: the key's names and the glob scopes, not every constraint (regression:
        100,000 retained controls made each task start scan all of them)."""
        exact, project = self._exact, self.project
        found = list(exact.get(("global", ""), ()))
        for kind, (names, _) in _SCOPE_KINDS.items():
            for name in names(key, project):
                found.extend(exact.get((kind, name), ()))
        for sk, (kind, pat) in self._globbed.items():
            if any(fnmatch.fnmatchcase(v, pat) for v in _SCOPE_KINDS[kind][0](key, project)):
                found.append(sk)
        if len(found) > 1:
            rank, order = _TYPE_RANK, self._order
            found.sort(key=lambda sk: (rank[sk[1]], order[sk]))
        return found

    def _needs(self, key):
        """What a unit of ``key`` must be able to take: (state, amount) pairs, the
        matching states then capacities; ``takes``, the ones a grant reserves (pauses
        take nothing). Cached on the key until the constraints change."""
        if key.gen != self._gen:
            cost = key.cost
            needs = []
            base = key.base
            if base is not None and not self._keyscopes:
                # a keyed or costed call: the controls of its node's key (cached there)
                if base.mgen != self._gen:
                    base.matched = list(map(self._states.__getitem__, self._matching(base)))
                    base.mgen = self._gen
                matched = base.matched
            else:
                matched = map(self._states.__getitem__, self._matching(key))
            for st in matched:
                if st.since is not None and st.since > key.since:
                    continue  # (drains: see _Drain)
                if st.keyed:  # a per-key control: the part of the key's value, if any
                    if len(st.live) > st.sweep_at:
                        self._sweep_due = True
                    st = st.part(key)
                    if st is None:
                        continue
                needs.append((st, cost if st.weighted else 1))
            needs += [(self._caps[k], n) for k, n in key.amounts]
            if key.window is not None:
                needs.append((key.window, 1))
            key.needs = needs
            key.takes = [pair for pair in needs if pair[0].takes]
            key.gen = self._gen
        return key.needs

    def over_burst(self, key):
        """Why a start of ``key`` could never be admitted (its cost is above the burst of
        a rate limit that matches it), or None."""
        if key.cost <= 1:
            return None
        with self.lock:
            for st, n in self._needs(key):
                if st.weighted:
                    for rate, w in zip(st.label if type(st.label) is list else [st.label],
                                       st.windows):
                        if w[1] < n:
                            return (f"task {key.name!r} costs {n} tokens a start, more than "
                                    f"the burst {w[1]} of rate_limit on {st.scope} ({rate}): "
                                    f"it could never start; give that rate limit a burst of "
                                    f"at least {n}")
        return None

    def _queue(self, key, loop=None):
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(key, loop)
            for k, n in key.amounts:
                cap = self._caps[k]
                self._needers.setdefault(cap, {})[q] = n
                self._amounts.setdefault(cap, collections.Counter())[n] += 1
        return q

    def _forget(self, q):  # lock held: q has no waiters any more
        del self._queues[q.key]
        for k, n in q.key.amounts:
            cap = self._caps[k]
            del self._needers[cap][q]
            amounts = self._amounts[cap]
            amounts[n] -= 1
            if not amounts[n]:
                del amounts[n]
            self._wake(cap)  # what it held back by capacity FIFO may go on

    def _mixed(self, q):  # lock held: the capacities q needs whose waiters' amounts differ
        return [self._caps[k] for k, _ in q.key.amounts if len(self._amounts[self._caps[k]]) > 1]

    def _bigger_waits(self, cap, q, n, head, now):
        """Capacity FIFO, which parking alone cannot give: amounts differ, so an older
        waiter may need more of ``cap`` than is free although ``q`` fits (it fit, or
        something else held it back, when it was parked). Cost: the queues that wait
        for ``cap``, only while one of them needs more than ``n``."""
        amounts = self._amounts.get(cap)  # (none for an executor window: 1 each)
        if not amounts or max(amounts) <= n:
            return False
        for o, m in self._needers[cap].items():
            if (m > n and o.waiters and o.waiters[0].seq < head and not cap.can_take(m, now)
                    and not any(isinstance(st, _Pause) for st, _ in self._needs(o.key))):
                return True
        return False

    def _pend(self, q):  # lock held: the next pass looks at q (it must have waiters)
        head = q.waiters[0].seq
        e = q.pending
        if e is not None:
            if e[0] <= head:
                return
            e[2] = None  # its head became older: pending again, in its new place
        self._unpark(q)
        e = q.pending = [head, next(self._tie), q]
        heapq.heappush(self._ready, e)

    def _unpark(self, q):  # lock held
        if q.entries:
            left = q.left = [*q.left] if q.left else []
            for e in q.entries:
                parking = e[3]
                parking.drop(e)
                left.append(parking.state)
                if (parking.state.owner is not None and parking.dropped == len(parking.heap)
                        and self._parked.get(parking.state) is parking):
                    # an empty parking of a per-key part: gone, so the part may be swept
                    del self._parked[parking.state]
            q.entries = ()

    def _park(self, q, states):  # lock held: q's head is held back on each of states
        head = q.waiters[0].seq
        entries = q.entries = []
        parked = self._parked
        for st in states:
            parking = parked.get(st)
            if parking is None:
                parking = parked[st] = _Parking(st)
            e = [head if st.fair is None else st.order(q.key, head), next(self._tie), q,
                 parking]
            heapq.heappush(parking.heap, e)
            entries.append(e)

    def _wake(self, st, unless=None):  # lock held: st may admit more: its oldest parked
        # queue pends, unless that is ``unless`` (just looked at: held back on st itself)
        parking = self._parked.get(st)
        if parking is not None:
            e = parking.top()
            if e is not None and e[2] is not unless:
                self._pend(e[2])

    def enqueue(self, units, key):
        """Make ``units`` (of one node, so all with admission key ``key``, and in one
        state) wait for admission. Returns True when all were granted at once (the caller
        launches them); otherwise grants are dispatched and the caller reports those
        still waiting."""
        with self.lock:
            if not self._states and not self._waiting and not key.amounts and key.window is None:
                # fast path: nothing to decide, nobody to queue behind
                self._holders.update(units)
                _Unit.grant_all(units)
                return True
            granted = []
            if self._wait(units, key, granted):
                self._admit(granted)
            elif granted:
                self._post(granted)
        self._dispatch(granted)
        return False

    def enqueue_many(self, groups):
        """``enqueue`` for the units of one node with several keys (keyed or costed
        calls): ``groups`` is [(key, its units)], under one lock and one pass."""
        with self.lock:
            if not self._states and not self._waiting and not any(
                    key.amounts or key.window is not None for key, _ in groups):
                for _, units in groups:
                    self._holders.update(units)
                    _Unit.grant_all(units)
                return True
            admit, granted = False, []
            # Groups in readiness order, none interleaved with another (the common
            # case: a customer each): each may be granted as it is queued, FIFO intact.
            runs = granted if all(a[1][-1].seq < b[1][0].seq
                                  for a, b in zip(groups, groups[1:])) else None
            for key, units in groups:
                admit |= self._wait(units, key, runs)
            if admit:
                self._admit(granted)
            elif granted:
                self._post(granted)
        self._dispatch(granted)
        return False

    def _wait(self, units, key, granted):
        """(lock held) ``units`` wait; those that may start at once are granted (added
        to ``granted``; None: not here, units of other keys are waiting to be queued
        too). True if a pass must look at their queue."""
        if self._sweep_due:
            self._sweep()
        if (granted is not None and not self._ready and not key.amounts
                and key not in self._queues):
            # No queue of this key and no pass to wait for: what may start now starts
            # without being queued (as _grant would; a customer's first call under a
            # per-key limit, a chunk under a limit with room); the rest wait as usual.
            needs, takes, now = self._needs(key), key.takes, time.monotonic()
            k = 0
            for u in units:
                if not self._free(needs, key, u.seq, now):
                    break
                if takes:
                    _reserve(u, takes)
                k += 1
            if k:
                done = units if k == len(units) else units[:k]
                _Unit.grant_all(done)
                self._holders.update(done)
                granted.extend(done)
                if done is units:
                    return False
                units = units[k:]
        q = self._queue(key, units[0].run.loop)
        _Unit.wait_all(units)
        w = q.waiters
        if not w or w[-1].seq < units[0].seq:
            w.extend(units)
        else:  # ready earlier than some already waiting (a chunk later, or a retry)
            for u in units:
                _insort(w, u)
        self._waiting += len(units)
        if q.entries and w[0].seq < units[0].seq:
            # Queued behind a head that is parked: nothing can start until a state
            # that holds it back changes, and every change wakes it.
            return False
        if not q.entries and q.pending is None and not self._ready:
            # A new queue, and no pass to wait for: grant what may start, park the rest
            # at once (what a pass would do; the common case under a busy limit).
            if not key.amounts and granted is not None:
                self._grant(q, None, time.monotonic(), granted)
                return False
            self._needs(key)
            held = self._held_back(q, time.monotonic())
            if held:
                self._park(q, held)
                return False
        self._pend(q)
        return True

    def _free(self, needs, key, head, now):
        """(lock held) May a unit of ``key`` that became ready at ``head`` start now, with
        no queue of its key: every state it needs can give, and none has an older waiter
        parked on it (what _held_back finds empty). A state that raises: no (the queued
        path then finds it, and fails the control)."""
        parked = self._parked
        try:
            for st, n in needs:
                if st in self._failing or not st.can_take(n, now):
                    return False
                if st.fifo:
                    parking = parked.get(st)
                    top = parking.top() if parking is not None else None
                    if top is not None and top[0] < (
                            head if st.fair is None else st.order(key, head)):
                        return False
        except Exception:
            return False
        return True

    def _sweep(self, everything=False):  # lock held, before a pass (or all is idle):
        # per-key controls forget their idle parts, once they have doubled since the last
        # sweep (amortised O(1) a part)
        self._sweep_due = False
        now = time.monotonic()
        for st in self._keyed:
            if len(st.live) > st.sweep_at or everything and st.live:
                busy = (self._parked, self._wakes, self._failing)
                st.live = {v: p for v, p in st.live.items()
                           if not p.idle(now) or any(p in b for b in busy)}
                st.sweep_at = 2 * len(st.live) + 64
                self._gen += 1  # (no key's needs keeps a forgotten part)

    def _admit(self, granted=None):
        """THE admission routine (call with the lock held); returns granted units (added
        to ``granted``: those granted under this same hold of the lock before the pass),
        posted to their runs (see _post).

        Looks at the pending queues oldest head first, and grants from each while its
        head stays ahead of the next pending head and nothing holds it back; a queue
        held back is parked. A queue that left a parking wakes that state, unless it is
        now the oldest parked there (held back on the state itself), so the next oldest
        queue of the state is looked at in turn."""
        if granted is None:
            granted = []
        ready, queues = self._ready, self._queues
        now = time.monotonic()
        if self._sweep_due:
            self._sweep()
        while True:
            if not ready:
                if not self._refair:
                    break
                for st in self._refair:  # (queues parked by _grant on room: see there)
                    self._wake(st)
                self._refair.clear()
                continue
            e = heapq.heappop(ready)
            q = e[2]
            if q is None:
                continue
            q.pending = None
            if q.waiters:
                while ready and ready[0][2] is None:
                    heapq.heappop(ready)
                self._grant(q, ready[0][0] if ready else None, now, granted)
            elif queues.get(q.key) is q:
                self._forget(q)
            if q.pending is None and (q.left or q.key.amounts):
                # (pending again: this pass comes back to it.) Where it was parked, and
                # the capacities whose FIFO it may have held back (a smaller amount may
                # fit now: _bigger_waits), wake.
                full = self._full
                for st in [*q.left, *self._mixed(q)] if q.key.amounts else q.left:
                    if st in full:  # (one that cannot take even 1: nobody can)
                        continue
                    if st.fair is not None:
                        # at the end of the pass: its oldest parked queue would pend by
                        # readiness, before a value whose turn comes first (regression:
                        # b, a, b, c under a fair limit set to 3 over them granted b, a, b)
                        parking = self._parked.get(st)
                        top = parking.top() if parking is not None else None
                        if top is not None and top[2] is not q:
                            self._refair.append(st)
                    else:
                        self._wake(st, q)
                q.left = ()
        if granted:
            self._post(granted)
        return granted

    @staticmethod
    def _post(granted):
        """(lock held) Granted units go to their run's ``posted`` queue in the order
        granted, whichever thread granted them: the run launches them from there in
        that order (see _Run.launch). Posted under the lock that granted them, so a
        grant made later on another thread (a refill on the clock thread just after a
        pass on the loop) is posted after them (regression: the loop launched the
        refill's grant first, then its own earlier ones)."""
        for u in granted:
            u.run.posted.append(u)

    def _grant(self, q, bound, now, granted):
        """Grant from ``q`` (it has waiters, and is neither pending nor parked) while its
        head is not held back and not younger than ``bound`` (the next pending head);
        then it is parked, pending again, or forgotten (no waiters left)."""
        waiters = q.waiters
        self._needs(q.key)
        takes = q.key.takes
        fair = None
        while True:
            held = self._held_back(q, now)
            if held:
                self._park(q, held)
                return
            u = waiters.popleft()
            self._waiting -= 1
            if takes:
                _reserve(u, takes)
            u.grant()
            self._holders.add(u)
            granted.append(u)
            if not waiters:
                self._forget(q)
                return
            if bound is not None:
                if fair is None:
                    fair = [st for st, _ in takes if st.fair is not None]
                if fair:
                    # Another queue is pending, maybe of another value whose turn of a
                    # fair limit comes first: q waits its turn on the fair limits, looked
                    # at again at the end of the pass (regression: after a resume, one
                    # value's older backlog took every slot of the limit while another
                    # value's waiter, pending in the same pass, waited). Also when that
                    # queue's head is younger than q's next: pended by readiness, q's
                    # next went before it, its value's turn or not (regression: b, a, b, c
                    # under a fair limit of 3 granted b, a, b)
                    self._park(q, fair)
                    self._refair.extend(fair)
                    return
                if waiters[0].seq > bound:
                    self._pend(q)  # another queue's head became ready first
                    return

    def _held_back(self, q, now):
        """The states that hold the head of ``q`` back (empty: it may start): its pauses
        alone if it is paused (a paused waiter holds nothing back), else each state it
        cannot take from now, or that an older waiter is parked on (FIFO). Sets q.why."""
        head = q.waiters[0].seq
        held = paused = None
        parked = self._parked
        full = self._full = []  # states that could not give even 1
        for pair in q.key.needs:
            st, n = pair
            try:
                free = st not in self._failing and st.can_take(n, now)
            except Exception as exc:  # fail the constraint, never the admission routine
                free = False
                self._failing.add(st)
                self._broken(st, exc)
            if free:
                if not st.fifo:
                    continue
                parking = parked.get(st)
                top = parking.top() if parking is not None else None
                if top is None or top[2] is q or top[0] >= (
                        head if st.fair is None else st.order(q.key, head)):
                    if not (st.capacity and self._bigger_waits(st, q, n, head, now)):
                        continue
            else:
                if n == 1:
                    full.append(st)
                if st not in self._wakes:  # event-driven: wake when it may admit by itself
                    when = st.retry_at(now, n)
                    if when is not None:
                        self._wakes[st] = self.clock.call_at(
                            when, functools.partial(self._refilled, st))
            if held is None:
                q.why = pair
                held = []
            if st.fifo:
                held.append(st)
            else:
                paused = [*paused, st] if paused else [st]
        return paused or held or ()

    def _broken(self, st, exc):  # lock held: a state's code raised
        st = st.owner or st  # (a per-key part: its control)
        for key, s in self._states.items():
            if s is st:
                _log.error("constraint %s on %s failed (%r) and is removed", key[1], key[0],
                           exc)
                # removed by the clock thread, outside this lock; admission runs then
                c = self.constraints.get(key)
                self.clock.call_at(0, functools.partial(self.remove, *key, only=c,
                                                        origin=c.origin))
                break

    def _refilled(self, st):
        with self.lock:
            self._wakes.pop(st, None)
            self._wake(st)
            granted = self._admit() if self._ready else None
        self._dispatch(granted)

    def resize(self, st, total):
        """A capacity's total changes (an executor window read afresh). Growing admits
        waiters at once; shrinking never evicts (as a lowered limit)."""
        with self.lock:
            if st.total == total:
                return
            st.total = total
            self._wake(st)
            granted = self._admit() if self._ready else None
        self._dispatch(granted)

    def _give_back(self, u, began):  # lock held
        for st, n in u.held:
            st.give_back(u, n, began)
            if st in self._parked:
                self._wake(st)
        u.held = ()
        self._holders.discard(u)

    def observe(self, u, exc, seconds):
        """A body of ``u`` ended (``exc``: its error, or None), after ``seconds``: the
        adaptive limits it holds learn from it; each change is a ConstraintApplied event
        (its params carry the new ``limit``) and may admit waiters."""
        changed = []
        with self.lock:
            for st, _ in u.held:
                if st.__class__ is _Adaptive and st.active:
                    new = st.observe(exc, seconds)
                    if new is not None:
                        c = self.constraints.get((st.name, "adaptive"))
                        if c is not None:
                            changed.append(dataclasses.replace(
                                c, params={**c.params, "limit": new}))
                        self._wake(st)
            granted = self._admit() if changed and self._ready else None
        for c in changed:
            self._notify(True, c)
        self._dispatch(granted)

    def release(self, u):
        """The unit's body finished, or its grant is dropped before it began (state
        RUNNING, or GRANTED): give its slots (and, if it never began, its tokens) back.
        The caller moves the unit on (``_Unit.end``).

        Admission runs at once: a pass costs O(log queues) per grant, so the freed slot
        goes straight to the oldest waiter, and on the loop an async waiter's body runs
        in the finishing body's own task (fusion). (Passes were once deferred to the
        next loop iteration, to batch the releases of a wave, when each one looked at
        every waiting queue.)"""
        with self.lock:
            if u.held:
                self._give_back(u, u.state == _RUNNING)
                if self._keyed and not self._holders and not self._waiting:
                    self._sweep(everything=True)  # idle: per-key state keeps nothing idle
            else:  # nothing to give back (the common case without constraints)
                self._holders.discard(u)
            u.node.tally[_GRANTED] -= 1
            if not self._ready:
                return
            granted = self._admit()
        self._dispatch(granted)

    def drop_grant(self, u):
        """A granted unit will not start after all (its run is stopping or gone, or its
        resources failed): its grant and tokens go back, and it is DROPPED."""
        with self.lock:
            if u.state != _GRANTED:
                return
            self._give_back(u, False)
            u.drop()
            granted = self._admit() if self._ready else None
        self._dispatch(granted)

    def hand_over(self, u, to):
        """``u``'s slots pass to ``to``, a stand-in counted as granted until it is
        released (with_timeout: a sync body that runs on past its deadline keeps them
        while ``u`` moves on; see _Run._overdue). ``u`` is released as usual after."""
        with self.lock:
            to.held, u.held = u.held, ()
            self._holders.discard(u)
            self._holders.add(to)
            u.node.tally[_GRANTED] += 1

    def gate(self, u):
        """The start gate, called in the body's own thread right before the body begins.
        True: it begins (the unit is RUNNING). False: its run is stopping (the grant is
        given back, the unit is DROPPED), or a pause that matches it arrived after the
        grant (the grant is given back and the unit waits again at its old place)."""
        with self.lock:
            if u.run.stopping or (u.run._cut and u in u.run._cut):  # (or cancelled:
                self._give_back(u, False)                             # see _Run.cancel)
                u.drop()
            elif self._gates and self._gated(u):
                self._give_back(u, False)
                u.wait()
                q = self._queue(u.key, u.run.loop)
                _insort(q.waiters, u)
                self._waiting += 1
                if q.waiters[0] is u or not q.entries:
                    self._pend(q)
            else:
                for st, n in u.held:
                    st.begin(u, n)
                u.begin()
                return True
            granted = self._admit() if self._ready else None
        self._dispatch(granted)
        return False

    def began_unlocked(self, u):
        """A body began by the start gate's lock-free path, and a gated control appeared
        meanwhile: a limit set just then counts it (so none is missed)."""
        with self.lock:
            for st, n in u.held:
                st.began_unlocked(u, n)

    def _gated(self, u):  # lock held: does a state the gate re-checks hold u back?
        # the limits it holds (a limit set after its grant adopted it), then the pauses
        # that match it now
        for st, n in u.held:
            if not st.may_begin(u, n):
                return True
        if self._npause:
            return any(st.__class__ is _Pause for st, _ in self._needs(u.key))
        return False

    def _empty(self, q):  # lock held: q's waiters (moved on by the caller) leave it
        self._waiting -= len(q.waiters)
        q.waiters.clear()
        if q.pending is not None:
            q.pending[2] = q.pending = None
        self._unpark(q)
        self._forget(q)
        for st in q.left:  # what it held back by FIFO may go on
            self._wake(st)
        q.left = ()

    def drop_run(self, run):
        """Forget every waiting unit of ``run`` (it is stopping)."""
        with self.lock:
            for key, q in list(self._queues.items()):
                if key.run_id == run.run_id:
                    for u in q.waiters:
                        u.drop()
                    self._empty(q)
            granted = self._admit() if self._ready else None
        self._dispatch(granted)

    def pull(self, run, match):
        """(engine.cancel, on ``run``'s loop) Take every waiting unit of ``run`` whose
        admission key ``match`` accepts out of its queue (each is SKIPPED), and mark its
        units that hold a grant and match in ``run._cut`` (the gate refuses those not
        begun), both under one hold of the lock, so that no unit slips between a queue
        and a grant unseen. Returns (pulled, marked)."""
        pulled = []
        with self.lock:
            for key, q in list(self._queues.items()):
                if key.run_id == run.run_id and q.waiters and match(key):
                    for u in q.waiters:
                        u.cut()
                    pulled.extend(q.waiters)
                    self._empty(q)
            cut = run._cut
            held = [u for u in self._holders if u.run is run and type(u) is not _Overdue
                    and u not in cut and match(u.key)]
            if held:
                cut.update(dict.fromkeys(held))
                if not run._cut_gate:  # every body passes the locked gate meanwhile
                    run._cut_gate = True
                    self._gates += 1
            granted = self._admit() if pulled and self._ready else None
        self._dispatch(granted)
        return pulled, held

    def holders_of(self, run):
        """The units of ``run`` holding a grant (to cancel its running bodies)."""
        with self.lock:
            return [u for u in self._holders if u.run is run]

    @staticmethod
    def _dispatch(granted):
        if not granted:
            return
        if len(granted) == 1:
            granted[0].run.launch(granted)
            return
        by_run = {}
        for u in granted:
            by_run.setdefault(u.run, []).append(u)
        for run, units in by_run.items():
            run.launch(units)

    @staticmethod
    def _why(q):
        return q.why[0].why(q.why[1]) if q.why is not None else "queued"

    def reason(self, u):
        """Why a waiting unit waits (for status and TaskBlocked)."""
        q = self._queues.get(u.key)
        return self._why(q) if q is not None else "queued"

    BLOCKED_SHOWN = 100  # status lists this many waiting units; the counts have them all

    def waiting(self, most=None):
        """How many units wait, per (task, reason), most first: [{task_name, waits_on,
        count}] (every waiting unit, the ``most`` largest groups; one look per admission
        queue: a queue's waiters all wait on the same thing)."""
        groups = collections.Counter()
        with self.lock:
            for q in self._queues.values():
                if q.waiters:
                    groups[(q.key.name, self._why(q))] += len(q.waiters)
        return [{"task_name": t, "waits_on": w, "count": n} for (t, w), n in
                sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))[:most]]

    def snapshot(self, tallies):
        """Usage of every active constraint and capacity, and the first waiting units,
        for ``Engine.status``. ``tallies``: [(key, tally)] of the active runs' tasks, for
        how many matching tasks hold a grant (cost: tasks x their matches; a 'key:'
        scope matches calls, not tasks: the holders of a grant, times those scopes)."""
        now = time.time()
        mono = time.monotonic()
        with self.lock:
            running = dict.fromkeys(self.constraints, 0)
            for key, t in tallies:
                if t[_GRANTED]:
                    for sk in self._matching(key):
                        running[sk] += t[_GRANTED]
            if self._keyscopes:  # (regression: they showed 0 running)
                keyed = [sk for sk in self.constraints if sk[0].startswith("key:")]
                for u in self._holders:
                    if u.key.values:
                        for sk in keyed:
                            if self._matches(sk[0], u.key):
                                running[sk] += 1
            rows = []
            for (scope, kind), c in self.constraints.items():
                own = self._layers[(scope, kind)].get("local")
                row = {"scope": scope, "type": kind, "origin": c.origin,
                       "expires_in": c.expires_in(now),
                       "matching_running": running[(scope, kind)],
                       # the engine's own control, while the broker's is in force
                       "shadowed": None if own is None or own is c else own.describe()}
                try:
                    row.update(self._states[(scope, kind)].usage(mono))
                except Exception as exc:  # a failing state is being removed
                    row["error"] = repr(exc)
                rows.append(row)
            caps = {k: {"total": lim.total, "in_use": lim.borrowed} for k, lim in self._caps.items()}
            blocked = []
            for q in self._queues.values():
                why = self._why(q)
                for u in itertools.islice(q.waiters, self.BLOCKED_SHOWN - len(blocked)):
                    blocked.append({"run_id": u.run.run_id, "task_id": u.id,
                                    "task_name": q.key.name, "waits_on": why})
                if len(blocked) >= self.BLOCKED_SHOWN:
                    break
            return rows, caps, blocked


# ===========================================================================
# Pub/sub: in-process broker, MQTT hook, Controller
# ===========================================================================
_MAX_PAYLOAD = 64 * 1024  # larger messages are handed on raw, never parsed


def _topic_matches(filter: str, topic: str) -> bool:
    """True if MQTT 3.1.1 topic filter `filter` matches topic name `topic`.

    `+` matches exactly one level (an empty one too), `#` matches any number of
    levels including none (`a/#` matches `a`), and a topic starting with `$` is
    not matched by a filter whose first level is `+` or `#`. Agrees with
    paho's `topic_matches_sub` on all valid filters and topics.
    """
    if topic[:1] == "$" and filter[:1] in ("+", "#"):
        return False
    f, t = filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return i == len(f) - 1  # a '#' that is not last never matches
        if i == len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def _filters_overlap(a: str, b: str) -> bool:
    """Could one topic match both MQTT filters ``a`` and ``b``?"""
    la, lb = a.split("/"), b.split("/")
    for x, y in zip(la, lb):
        if x == "#" or y == "#":
            return True
        if x != y and x != "+" and y != "+":
            return False
    if len(la) == len(lb):
        return True
    longer = la if len(la) > len(lb) else lb
    return len(longer) == min(len(la), len(lb)) + 1 and longer[-1] == "#"


def _check_topic(topic: str, is_filter: bool) -> None:
    if not isinstance(topic, str) or not topic or "\0" in topic:
        raise ValueError(f"MQTT topic must be a non-empty str without NUL, got {topic!r}")
    if not is_filter and ("+" in topic or "#" in topic):
        raise ValueError(f"cannot publish to {topic!r}: '+' and '#' are for subscriptions only")
    # '#' only as the whole last level; '+' only as a whole level
    if is_filter and ("#" in topic[:-1] or any("+" in lv and lv != "+" for lv in topic.split("/"))
                      or topic[-1:] == "#" and topic[-2:-1] not in ("", "/")):
        raise ValueError(f"invalid topic filter {topic!r}: '+' must fill a whole level "
                         "and '#' must be the whole last level")


def _decode_payload(raw: Any) -> Any:
    """Turn a payload from a wire (bytes, bytearray or str) into a value.

    Empty → `""` (the MQTT "clear" message). Longer than `_MAX_PAYLOAD` → the raw
    bytes, unparsed. Valid UTF-8 JSON → the decoded value, of any JSON type.
    Anything else → the raw bytes (bytearray becomes bytes): the engine, not the
    connector, rejects a bad payload, so it can say why.
    """
    if not raw:
        return ""
    if isinstance(raw, bytearray):
        raw = bytes(raw)
    if len(raw) > _MAX_PAYLOAD:
        return raw
    try:
        return json.loads(raw if isinstance(raw, str) else raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return raw


def _encode_payload(payload: Any) -> bytes:
    """`""`/None → b"" (clears a retained message); bytes pass through unchanged
    (so tests can send garbage through any connector); anything else → compact
    UTF-8 JSON. Raises TypeError if not JSON-serialisable, ValueError for NaN,
    infinities and circular references."""
    if payload is None or (isinstance(payload, str) and not payload):
        return b""
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Schedule `fn(*args)` on `loop`; False (and nothing done) if it is closed.

    From inside the running `loop` this is `loop.call_soon`, never a direct
    call: a direct call would overtake messages already queued from other
    threads and re-enter the publisher.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    try:
        if running is loop:
            loop.call_soon(fn, *args)
        elif loop.is_closed():
            return False
        else:
            loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # closed between the check and the call
        return False
    return True


def _follow(result: Any, callback: Callable, topic: str, tasks: set | None) -> None:
    """An awaitable that a callback returned runs as a task; its failure is logged."""
    try:
        if not inspect.isawaitable(result):
            return
        task = asyncio.ensure_future(result)
    except Exception:
        _log.exception("pub/sub callback %r failed on topic %r", callback, topic)
        return
    if tasks is not None:
        tasks.add(task)

    def done(t: asyncio.Future) -> None:
        if tasks is not None:
            tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            _log.error("pub/sub callback %r failed on topic %r", callback, topic,
                       exc_info=t.exception())
    task.add_done_callback(done)


def _latest_only(callback: Callable) -> Callable:
    """Mark a subscription callback as wanting, of the messages still queued for it,
    only the newest of each topic (the engine's control subscription: a retained topic
    is state, and the broker itself keeps only its newest message). See _Mailbox."""
    callback._latest_only = True
    return callback


class _Subscription:
    """One (filter, callback) pair, bound to the loop that subscribed it. Its messages
    go through its hub's _Mailbox for that loop."""
    __slots__ = ("filter", "callback", "loop", "active", "replay", "acked", "tasks",
                 "mailbox", "latest_only")

    def __init__(self, filter: str, callback: Callable[[str, Any], Any]) -> None:
        _check_topic(filter, is_filter=True)
        if not callable(callback):
            raise TypeError(f"subscribe({filter!r}, callback): callback must be callable "
                            f"as callback(topic, payload), got {callback!r}")
        self.filter, self.callback = filter, callback
        self.loop = asyncio.get_running_loop()
        # active: cleared by unsubscribe so queued deliveries are dropped.
        # replay/acked: whether retained (retain=1) messages are for us; see _Hub._acked.
        self.active, self.replay, self.acked = True, True, False
        self.tasks: set = set()
        self.mailbox = None  # set by _Hub._insert
        self.latest_only = getattr(callback, "_latest_only", False)

    # hub lock held, any thread; size: the payload's bytes on the wire (0: unknown)
    def push(self, topic: str, payload: Any, size: int = 0) -> bool:
        return self.mailbox.push(self, topic, (payload,), size)

    def push_many(self, topic: str, payloads: list) -> bool:  # hub lock held, any thread
        return self.mailbox.push(self, topic, payloads, 0)  # shared by subscriptions: read only

    def deliver(self, topic: str, payloads) -> None:  # on self.loop
        cb = self.callback
        for payload in payloads:
            if not self.active:
                return
            try:
                result = cb(topic, payload)
            except Exception:
                _log.exception("pub/sub callback %r failed on topic %r", cb, topic)
                continue
            if result is not None:
                _follow(result, cb, topic, self.tasks)


class _Mailbox:
    """What one hub delivers on one event loop, to all of its subscriptions there, in
    the order it was fanned out, and drained by loop callbacks of at most DRAIN_CHUNK
    messages each: a burst costs one wake-up of the loop, not one per message, and a
    storm never holds the loop (regression: 1.25 million messages drained in one
    callback, during which almost no task ran). One order for all the loop's
    subscriptions keeps their relative order across chunks, which the sync marker
    relies on: it comes after every retained control, whatever the chunking
    (regression: with 5,000 retained controls, 1,000 were applied after the first task).

    Bounded, since a loop that falls behind must not buffer without end (regression: a
    LocalBroker storm queued 540 MB; 200 x 1 MiB and 2,001 x 60 KB bad control payloads
    through Mosquitto 320 MB, all to be rejected):

    - A ``_latest_only`` subscription (the engine's control subscription) has at most
      one message queued per topic: a newer one replaces the one still waiting, in its
      place. The last message of a topic wins, as before; a control superseded while
      queued is never seen (as by an engine that joins late: the broker keeps only the
      newest retained message), and the replacement keeps the place of the first, so
      the sync marker still comes after it. Controls are never dropped (a retained
      burst of 100,000 controls is all applied before the first task): they are
      bounded by their topics, each at most 64 KiB (a larger payload is kept cut, to be
      rejected for its size all the same).
    - Beyond MAX_QUEUED messages, or MAX_BYTES of their wire payloads, queued on this
      loop for other subscriptions, the oldest of them are dropped, counted in
      ``dropped``; the message just queued is always kept. One warning per episode,
      logged on the loop when it next drains; the episode ends, with one INFO line,
      once the queue has emptied.

    Two queues (controls, the rest) of entries ``[seq, sub, topic, payloads, size]``,
    merged by ``seq`` when drained, so dropping and coalescing are O(1) each.
    invariant: queues, counts and ``scheduled`` change only under the hub's lock, and
    ``scheduled`` is True exactly while a drain is to come, so no message is ever left
    in a queue without one."""
    __slots__ = ("loop", "lock", "queue", "latest", "slots", "seq", "count", "bytes",
                 "scheduled", "alive", "dropped", "shed", "warned")
    DRAIN_CHUNK = 1000
    MAX_QUEUED = 100_000       # messages queued on one loop, all subscriptions together
    MAX_BYTES = 64 * 1024**2   # bytes of their wire payloads (live in-process objects: 0)

    def __init__(self, loop, lock):
        self.loop, self.lock = loop, lock  # lock: the hub's
        self.queue, self.latest = collections.deque(), collections.deque()
        self.slots = {}  # (sub, topic) -> its entry in self.latest
        self.seq = self.count = self.bytes = 0
        self.scheduled, self.alive = False, True
        self.dropped = 0   # ever, for the hub's repr
        self.shed = 0      # in this episode
        self.warned = 0    # of them, how many the episode's warning told of

    def push(self, sub, topic, payloads, size) -> bool:  # hub lock held
        self.seq += 1
        if sub.latest_only:
            last = payloads[-1]
            if isinstance(last, (bytes, bytearray)) and len(last) > _MAX_PAYLOAD:
                last = last[:_MAX_PAYLOAD + 1]  # rejected all the same, for its size
            entry = self.slots.get((sub, topic))
            if entry is not None:  # superseded while queued: the newest takes its place
                entry[3] = [last]
            else:
                entry = self.slots[(sub, topic)] = [self.seq, sub, topic, [last], 0]
                self.latest.append(entry)
        else:
            self.queue.append([self.seq, sub, topic, payloads, size])
            self.count += len(payloads)
            self.bytes += size
            if self.count > self.MAX_QUEUED or self.bytes > self.MAX_BYTES:
                self._shed()
        if not self.scheduled:
            self.scheduled = True
            if not _call_soon(self.loop, self.drain):
                self.alive = False  # its loop has closed
        if not self.alive:
            sub.active = False
        return self.alive

    def _shed(self) -> None:  # hub lock held
        q = self.queue
        while self.count > self.MAX_QUEUED or self.bytes > self.MAX_BYTES:
            if len(q) <= 1:
                return  # only the message just queued is left
            _, sub, topic, payloads, size = q.popleft()
            self.count -= len(payloads)
            self.bytes -= size
            self.dropped += len(payloads)
            self.shed += len(payloads)

    def drain(self) -> None:  # runs on self.loop
        batch, budget = [], self.DRAIN_CHUNK
        with self.lock:
            q, latest = self.queue, self.latest
            while budget > 0 and (q or latest):
                if latest and (not q or latest[0][0] < q[0][0]):
                    _, sub, topic, payloads, _ = latest.popleft()  # (not counted)
                    del self.slots[(sub, topic)]
                else:
                    _, sub, topic, payloads, size = entry = q[0]
                    if len(payloads) > budget:  # the rest of this batch waits for the next turn
                        entry[3], payloads, size = payloads[budget:], payloads[:budget], 0
                    else:
                        q.popleft()
                    self.count -= len(payloads)
                    self.bytes -= size
                budget -= len(payloads)
                batch.append((sub, topic, payloads))
            more = bool(q or latest)
            self.scheduled = more
            warn = self.shed if self.shed and not self.warned else 0
            if warn:
                self.warned = warn  # how many the warning told of
            ended = 0
            if self.warned and not more:  # caught up: the episode is over
                ended = self.shed if self.shed > self.warned else 0  # (untold drops)
                self.shed = self.warned = 0
        if warn:
            _log.warning("pub/sub: an event loop fell behind (over %s messages or %d MiB "
                         "queued); dropped the %d oldest (further drops are not logged until "
                         "it catches up)", f"{self.MAX_QUEUED:,}", self.MAX_BYTES >> 20, warn)
        if ended:
            _log.info("pub/sub: the event loop caught up; %d queued messages were dropped in "
                      "all", ended)
        try:
            for sub, topic, payloads in batch:
                sub.deliver(topic, payloads)
        finally:  # (a callback's KeyboardInterrupt must not leave the rest undrained)
            if more and not _call_soon(self.loop, self.drain):
                self.alive = False


class _Hub:
    """Subscription table shared by LocalBroker and MqttConnector.

    invariant: messages for one subscription are queued on its loop while
    `_lock` is held, so each subscription sees them in the order they were
    fanned out, whichever threads publish. What waits for a loop is bounded
    (the engine's controls coalesced, the oldest dropped beyond a bound): see
    _Mailbox.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list = []
        self._matching: dict = {}  # topic -> subscriptions whose filter matches it
        self._clients = 0  # connect() minus disconnect(); only for repr
        self._mailboxes = weakref.WeakKeyDictionary()  # loop -> its _Mailbox

    def _insert(self, sub: _Subscription) -> None:  # lock held
        box = self._mailboxes.get(sub.loop)
        if box is None or not box.alive:
            box = self._mailboxes[sub.loop] = _Mailbox(sub.loop, self._lock)
        sub.mailbox = box
        # MQTT: subscribing the same filter again replaces the subscription
        for s in self._subs:
            if s.filter == sub.filter and s.callback == sub.callback:
                s.active = False
        self._subs = [s for s in self._subs if s.active] + [sub]
        self._matching = {}

    def _remove(self, filter: str, callback: Callable) -> tuple:
        """Drop (filter, callback); return (removed?, filter still wanted?)."""
        with self._lock:
            gone = [s for s in self._subs if s.filter == filter and s.callback == callback]
            for s in gone:
                s.active = False
            self._subs = [s for s in self._subs if s.active]
            self._matching = {}
            return bool(gone), any(s.filter == filter for s in self._subs)

    def _dropped(self) -> int:
        """Messages dropped so far because a loop fell behind (see _Mailbox)."""
        with self._lock:
            return sum(box.dropped for box in self._mailboxes.values())

    def _subs_for(self, topic: str) -> tuple:  # lock held
        subs = self._matching.get(topic)
        if subs is None:
            if len(self._matching) > 4096:  # one entry per topic seen: keep it bounded
                self._matching = {}
            subs = self._matching[topic] = tuple(
                s for s in self._subs if _topic_matches(s.filter, topic))
        return subs

    def _fanout(self, topic: str, payload: Any, retained: bool = False,
                size: int = 0) -> None:  # lock held; size: bytes on the wire
        subs = self._subs_for(topic)
        dead = False
        for s in subs:
            if (s.replay or not retained) and s.active and not s.push(topic, payload, size):
                dead = True  # its loop has closed: drop it silently
        if dead:
            self._subs = [s for s in self._subs if s.active]
            self._matching = {}

    def _acked(self, sub: _Subscription) -> None:  # lock held, in wire order
        # A SUBSCRIBE makes the broker (re)send retained messages matching its filter,
        # flagged retain=1. Another subscription whose filter overlaps it got its own
        # retained burst already, so from here on such messages are for `sub` only: no
        # stale replays to an engine that shares this connection. A subscription whose
        # filter cannot match the same topics keeps accepting its burst (regression: a
        # sync marker's SUBACK cut the control subscription's burst short when the
        # broker sends at most max_inflight_messages at a time), and so do those still
        # awaiting their own SUBACK.
        for s in self._subs:
            if s.acked and s is not sub and not s.latest_only and _filters_overlap(s.filter, sub.filter):
                s.replay = False
        sub.acked = True


class LocalBroker(_Hub):
    """In-process broker with MQTT semantics; the default connector.

    Retained messages (a retained `""` clears the topic's retained message and
    is still delivered to current subscribers), `+`/`#`, `$`-topics hidden from
    leading wildcards. Thread-safe: engines on different threads and loops may
    share one. A callback runs on the loop that awaited `subscribe`, after
    `publish` returns, in publish order; on subscribe, matching retained
    messages are queued for that subscription alone, before any later publish
    (subscribe `x/#`, publish a marker on `x/sync/1`: the marker comes after
    every retained `x/...`). `disconnect()` removes nothing: each user
    unsubscribes its own callbacks. Subscriptions whose loop has closed are
    dropped silently.

    Payloads: being in-process, a live message is handed to its subscribers as
    the very object that was published (no serialisation; treat payloads as
    read-only). Retained messages are stored as JSON (a payload that is not
    JSON-serialisable raises TypeError) and each late subscriber decodes its own
    copy. Bytes are decoded as they would be off the wire, so garbage arrives
    as raw bytes, as it would from an MQTT broker.
    """

    def __init__(self, *, prefix: str = _PREFIX) -> None:
        super().__init__()
        self.prefix = _check_prefix(prefix)  # the topics engines and controllers use
        self._retained: dict = {}  # topic -> encoded payload (never b"")

    def __repr__(self) -> str:
        return (f"<LocalBroker connected={self._clients > 0} "
                f"subscriptions={len(self._subs)} retained={len(self._retained)} "
                f"dropped={self._dropped()}>")

    async def connect(self) -> None:
        with self._lock:
            self._clients += 1

    async def disconnect(self) -> None:
        with self._lock:
            self._clients = max(0, self._clients - 1)

    async def publish(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> None:
        self.publish_nowait(topic, payload, retain)

    def publish_many_nowait(self, topic: str, payloads: list) -> None:
        """Publish ``payloads`` (not retained) to ``topic`` in order, without a coroutine
        and under one lock: the engine's telemetry flushes through it."""
        if topic not in self._matching:
            _check_topic(topic, is_filter=False)
        with self._lock:
            dead = False
            for s in self._subs_for(topic):
                if s.active and not s.push_many(topic, payloads):
                    dead = True
            if dead:
                self._subs = [s for s in self._subs if s.active]
                self._matching = {}

    def publish_soon(self, topic: str, payload: Any, wait: Optional[float] = None) -> bool:
        """Publish a retained message from any thread (see _Link.publish_soon)."""
        self.publish_nowait(topic, payload, retain=True)
        return True

    def publish_nowait(self, topic: str, payload: Any, retain: bool = False) -> None:
        """``publish`` without a coroutine: for in-process publishers on a hot path."""
        if topic not in self._matching:
            _check_topic(topic, is_filter=False)
        if payload is None or isinstance(payload, (str, bytes, bytearray)) and not payload:
            payload, raw = "", b""  # the empty message (a retained one clears)
        elif isinstance(payload, (bytes, bytearray)):  # as if off the wire, kept as sent
            raw = bytes(payload)  # (regression: b"null" was retained as the empty message)
            payload = _decode_payload(raw)
        else:
            raw = _encode_payload(payload) if retain else None  # raises before storing
        with self._lock:
            if retain and raw:
                self._retained[topic] = raw
            elif retain:
                self._retained.pop(topic, None)
            self._fanout(topic, payload, size=len(raw) if raw else 0)

    async def subscribe(self, topic: str, callback: Callable[[str, Any], Any]) -> None:
        sub = _Subscription(topic, callback)
        with self._lock:
            self._insert(sub)
            if "+" in topic or "#" in topic:
                retained = [(t, raw) for t, raw in self._retained.items()
                            if _topic_matches(topic, t)]
            else:  # one topic (a Controller's read-back, a sync marker): no scan
                raw = self._retained.get(topic)
                retained = [] if raw is None else [(topic, raw)]
            for t, raw in retained:  # queued before any later publish
                sub.push(t, _decode_payload(raw), len(raw))

    async def unsubscribe(self, topic: str, callback: Callable[[str, Any], Any]) -> None:
        self._remove(topic, callback)


class MqttConnector(_Hub):
    """Connector over a paho-mqtt 2.x or aiomqtt 2.x client the user built,
    configured and connected (aiomqtt: inside its `async with`). Never
    disconnects it. Messages go out from the connector's own filter table: once
    per matching subscription, on the loop that subscribed it, in arrival
    order, decoded by `_decode_payload` (garbage arrives as raw bytes).
    Subscriptions use QoS 1; `subscribe` returns after the SUBACK, `publish`
    with qos>0 after the broker's ack; waits are bounded by `timeout` seconds.

    paho (either callback API version): `connect()` starts the network thread
    (`loop_start`; don't run `loop_forever` yourself) and waits until connected.
    It chains, never replaces, the client's on_message/on_connect/on_subscribe/
    on_publish/on_unsubscribe/on_disconnect (set yours first). After a reconnect every filter
    is subscribed again, so retained messages arrive again.

    aiomqtt: `connect()` starts a task reading `client.messages` (don't read
    them too: aiomqtt has one queue). aiomqtt does not reconnect: the reader
    stops, logged. A later subscribe on a shared aiomqtt connector may replay
    retained messages to earlier subscriptions (paho filters by SUBACK order).
    """

    def __init__(self, client: Any, *, timeout: float = 10.0, prefix: str = _PREFIX) -> None:
        super().__init__()
        self.prefix = _check_prefix(prefix)  # the topics engines and controllers use
        if callable(getattr(client, "loop_start", None)) and (
                hasattr(client, "message_callback_add") or hasattr(client, "on_message")):
            self._kind = "paho"
        elif hasattr(client, "messages") and inspect.iscoroutinefunction(getattr(client, "subscribe", None)):
            self._kind = "aiomqtt"
        else:
            raise TypeError(
                "MqttConnector(client) needs a connected paho-mqtt 2.x Client (with loop_start, "
                "on_message, subscribe, publish) or an aiomqtt 2.x Client entered with 'async with'; "
                f"got {type(client).__name__}")
        self._client, self._timeout = client, timeout
        self.connects = 0  # (re)connections seen by on_connect
        self._watchers: list = []  # (loop, fn): fn() runs on loop after each (re)connect
        self._waiting: dict = {}  # mid -> (future, subscription or None)
        self._lost_on_disconnect: dict = {}  # mid -> (future, what): (UN)SUBSCRIBEs waiting
        self._drops = 0  # connections lost (on_disconnect)
        self._early: collections.OrderedDict = collections.OrderedDict()  # acks that beat us
        self._conn_waiters: list = []
        self._hooked = False
        self._start_lock = threading.Lock()  # hook and network thread: once
        self._reader: asyncio.Task | None = None

    def __repr__(self) -> str:
        up = (self._client.is_connected() if self._kind == "paho"
              else self._reader is not None and not self._reader.done())
        return (f"<MqttConnector {self._kind} {'connected' if up else 'disconnected'} "
                f"subscriptions={len(self._subs)} dropped={self._dropped()}>")

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._clients += 1
        if self._kind == "aiomqtt":
            if self._reader is None or self._reader.done():
                self._reader = loop.create_task(self._read())
            return
        fut = loop.create_future()
        with self._start_lock:  # (regression: runs starting at once ran several network
            # threads on one socket, and hooked the callbacks twice)
            if not self._hooked:
                self._hook()
                _no_delay(self._client)  # (already connected: on_connect has been and gone)
            with self._lock:  # register before checking, so on_connect cannot slip between
                self._conn_waiters.append(fut)
            self._client.loop_start()  # MQTT_ERR_INVAL if the network thread already runs
        try:
            if not self._client.is_connected():
                await asyncio.wait_for(fut, self._timeout)
        except asyncio.TimeoutError:
            with self._lock:
                self._clients -= 1
            raise ConnectionError(f"MQTT client not connected after {self._timeout:g}s: call "
                                  "client.connect(host, port) before MqttConnector.connect()") from None
        finally:
            with self._lock:
                if fut in self._conn_waiters:
                    self._conn_waiters.remove(fut)

    async def disconnect(self) -> None:
        with self._lock:
            self._clients = max(0, self._clients - 1)
            reader = self._reader if self._clients == 0 else None
        if reader is not None:
            reader.cancel()
            await asyncio.wait([reader])  # unlike `await reader`, keeps our own cancellation

    async def publish(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> None:
        _check_topic(topic, is_filter=False)
        raw = _encode_payload(payload)
        if self._kind == "aiomqtt":
            await self._client.publish(topic, raw, qos=qos, retain=retain)
            return
        if qos and not retain and not self._client.is_connected():
            # not connected: a live message (telemetry) is dropped at once, never handed
            # to paho, which would queue it without bound and send it stale on reconnect
            # (a retained control is handed over, kept by paho and waited for)
            raise ConnectionError(f"MQTT publish to {topic!r} failed: not connected")
        info = self._client.publish(topic, raw, qos, retain)
        if qos:  # NO_CONN still queues it in paho: wait for the ack either way
            await self._await_ack(info.mid, None, f"acknowledgement of publish to {topic!r}")
        elif info.rc != 0:
            raise ConnectionError(f"MQTT publish to {topic!r} failed: {getattr(info.rc, 'name', info.rc)}")

    def publish_soon(self, topic: str, payload: Any, wait: Optional[float] = None) -> bool:
        """Publish a retained message (QoS 1) from any thread without waiting for its ack
        (paho: or up to ``wait`` seconds for it): True if the client took it. Not
        connected: False, nothing queued (paho would send it stale on reconnect)."""
        _check_topic(topic, is_filter=False)
        raw = _encode_payload(payload)
        if self._kind == "paho":
            if not self._client.is_connected():
                return False
            info = self._client.publish(topic, raw, 1, True)
            if wait and info.rc == 0:
                info.wait_for_publish(wait)
            return info.rc == 0
        reader = self._reader  # aiomqtt: on the loop its client lives on
        if reader is None or reader.done():
            return False
        asyncio.run_coroutine_threadsafe(self._client.publish(topic, raw, qos=1, retain=True),
                                         reader.get_loop()).add_done_callback(_quiet_future)
        return True

    async def subscribe(self, topic: str, callback: Callable[[str, Any], Any]) -> None:
        sub = _Subscription(topic, callback)
        with self._lock:
            self._insert(sub)
        try:
            if self._kind == "aiomqtt":
                granted = await self._client.subscribe(topic, qos=1)
            else:
                drops = self._drops
                rc, mid = self._client.subscribe(topic, qos=1)
                if rc != 0:
                    raise ConnectionError(f"MQTT subscribe to {topic!r} failed: {getattr(rc, 'name', rc)}")
                granted = await self._await_ack(mid, sub, f"SUBACK for {topic!r}", drops)
            if any(int(getattr(g, "value", g)) >= 0x80 for g in granted or ()):
                raise PermissionError(f"MQTT broker refused the subscription to {topic!r} (check its ACL)")
        except BaseException:
            self._remove(topic, callback)
            raise

    async def unsubscribe(self, topic: str, callback: Callable[[str, Any], Any]) -> None:
        """UNSUBSCRIBE goes out once no callback wants `topic`; errors are logged."""
        removed, wanted = self._remove(topic, callback)
        if not removed or wanted:
            return
        try:
            if self._kind == "aiomqtt":
                await self._client.unsubscribe(topic)
            else:
                drops = self._drops
                rc, mid = self._client.unsubscribe(topic)
                if rc == 0:
                    await self._await_ack(mid, None, f"UNSUBACK for {topic!r}", drops)
        except Exception as exc:
            _log.debug("MQTT unsubscribe from %r failed: %r", topic, exc)

    async def _read(self) -> None:
        try:
            async for m in self._client.messages:
                with self._lock:
                    self._fanout(m.topic.value, _decode_payload(m.payload), size=len(m.payload))
        except Exception as exc:  # aiomqtt raises MqttError when the connection ends
            if exc.__cause__ is None and "Disconnected" in str(exc):
                # the user's `async with aiomqtt.Client()` ended: a normal disconnect
                # (aiomqtt chains the error of a failed connection as the cause)
                _log.debug("MQTT reader stopped: the aiomqtt client disconnected")
                return
            _log.error("MQTT reader stopped (%r); re-create the client and connector to "
                       "resume", exc.__cause__ or exc)

    async def _await_ack(self, mid: int, sub: _Subscription | None, what: str,
                         drops: Optional[int] = None) -> Any:
        """Wait for the ack of ``mid``. With ``drops`` (the connection drops counted when
        it was sent): a (UN)SUBSCRIBE, which paho does not send again after a reconnect,
        so the wait fails with ConnectionError once the connection has dropped since
        (regression: a network blip during a sync cost a 5 s wait)."""
        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            if mid in self._early:  # the ack arrived before paho gave us the mid
                if sub is not None:
                    self._acked(sub)
                return self._early.pop(mid)
            if drops is not None and drops != self._drops:
                raise ConnectionError(f"the connection was lost before the {what}; try again")
            self._waiting[mid] = (fut, sub)
            if drops is not None:
                self._lost_on_disconnect[mid] = (fut, what)
        try:
            return await asyncio.wait_for(fut, self._timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no {what} from the MQTT broker within {self._timeout:g}s") from None
        finally:
            with self._lock:
                self._waiting.pop(mid, None)
                self._lost_on_disconnect.pop(mid, None)

    def _ack(self, mid: int, result: Any) -> None:  # paho network thread
        with self._lock:
            entry = self._waiting.pop(mid, None)
            self._lost_on_disconnect.pop(mid, None)
            if entry is None:
                # Bounded: unawaited acks (qos 0 publishes, the user's own calls)
                # land here too; mids are reused only after 65535 others.
                self._early[mid] = result
                while len(self._early) > 64:
                    self._early.popitem(last=False)
                return
            fut, sub = entry
            if sub is not None:
                self._acked(sub)
        _call_soon(fut.get_loop(), _resolve_future, fut, result)

    def _hook(self) -> None:
        c, self._hooked = self._client, True
        prev = {n: getattr(c, n) for n in ("on_message", "on_connect", "on_subscribe",
                                            "on_publish", "on_unsubscribe", "on_disconnect")}

        def chained(name: str, ours: Callable[..., None]) -> Callable[..., None]:
            def hook(*args: Any) -> None:  # args differ between paho callback API versions
                try:
                    ours(*args)
                except Exception:  # an exception here would kill paho's network thread
                    _log.exception("MqttConnector %s hook failed", name)
                if prev[name] is not None:
                    prev[name](*args)
            return hook

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self._lock:
                self._fanout(msg.topic, _decode_payload(msg.payload), bool(msg.retain),
                             len(msg.payload))

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, *rest: Any) -> None:
            if rc != 0:
                return
            _no_delay(client)
            with self._lock:
                self.connects += 1  # (an engine's link re-syncs: see _Link._sync)
                for s in self._subs:
                    s.replay = True  # every filter gets its retained burst again
                filters = sorted({s.filter for s in self._subs})
                waiters, self._conn_waiters = self._conn_waiters, []
                watchers = list(self._watchers)
            if filters:  # broker restart or clean session: subscriptions are gone
                client.subscribe([(f, 1) for f in filters])
            for fut in waiters:
                _call_soon(fut.get_loop(), _resolve_future, fut, None)
            for loop, fn in watchers:
                _call_soon(loop, fn)

        def on_disconnect(client: Any, *args: Any) -> None:
            # A (UN)SUBSCRIBE whose ack had not come is gone with its connection (paho
            # does not send it again): its wait fails now, not after the timeout.
            with self._lock:
                self._drops += 1
                lost, self._lost_on_disconnect = self._lost_on_disconnect, {}
                for mid in lost:
                    self._waiting.pop(mid, None)
            for fut, what in lost.values():
                _call_soon(fut.get_loop(), _fail_future, fut, ConnectionError(
                    f"the connection was lost before the {what}; try again"))

        c.on_message = chained("on_message", on_message)
        c.on_connect = chained("on_connect", on_connect)
        c.on_disconnect = chained("on_disconnect", on_disconnect)
        c.on_subscribe = chained("on_subscribe", lambda cl, u, mid, granted, *r: self._ack(mid, granted))
        def on_publish(client: Any, userdata: Any, mid: int, *rest: Any) -> None:
            self._ack(mid, None)
            _quick_ack(client)

        c.on_publish = chained("on_publish", on_publish)
        c.on_unsubscribe = chained("on_unsubscribe", lambda cl, u, mid, *r: self._ack(mid, None))


def _no_delay(client: Any) -> None:
    """TCP_NODELAY on a paho client's socket: small messages (a sync marker, a run's
    telemetry) go out at once, not after Nagle's algorithm waits for the ack of the last
    (about 40-90 ms a run on some systems). A socket that is not TCP is left alone."""
    try:
        sock = client.socket()
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def _quick_ack(client: Any) -> None:
    """After a PUBACK: have the kernel acknowledge what the broker sent at once, not
    after its delayed-ACK timer. Mosquitto leaves Nagle's algorithm on by default
    (set_tcp_nodelay false), so of several PUBACKs due at once it holds all but the
    first until that is acknowledged: the last messages of a telemetry burst waited
    about 40 ms for their acks. A no-op where TCP_QUICKACK does not exist."""
    if _TCP_QUICKACK is None:
        return
    try:
        sock = client.socket()
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except (OSError, AttributeError):
        pass


def _resolve_future(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _fail_future(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class Controller:
    """Steer every engine on a broker: the engine's control verbs as coroutines, each
    published as a retained message on ``<prefix>/constraints/<scope path>/<type>`` (the
    connector's prefix, "cascade" by default), so engines that join later honour it too::

        ctl = cs.Controller(cs.MqttConnector(client))
        await ctl.pause("task:api_call", ttl=60)
        print(await ctl.status())

    A verb returns once it has read back that the broker holds what it published (the
    control, or no message for resume/clear), by the marker round trip of ``status``;
    otherwise it raises NotKeptError naming the likely cause (a broker that drops a
    publish its ACL refuses still acknowledges it). Should another operator write the
    same topic between our publish and the read-back, the verb raises too, saying what
    the broker holds: the last write is in force, and it is not ours. Each read-back
    waits at most ``timeout`` seconds.
    """

    def __init__(self, connector: Any, *, timeout: float = 5.0) -> None:
        self.connector = _check_connector(connector)
        self.prefix = _prefix_of(connector)
        self.timeout = timeout  # bound of each read-back of the broker, in seconds
        self._connected = False

    async def _conn(self):
        if not self._connected:
            await self.connector.connect()
            self._connected = True
        return self.connector

    async def _publish(self, c):
        topic = _control_topic(c.scope, c.type, self.prefix)
        await (await self._conn()).publish(topic, c.to_dict(), qos=1, retain=True)
        await self._confirm({topic: c}, _what(c))
        return c

    async def _clear(self, scope, kinds, what):
        conn = await self._conn()
        topics = {_control_topic(_check_scope(scope), kind, self.prefix): None
                  for kind in kinds}
        for topic in topics:
            await conn.publish(topic, "", qos=1, retain=True)
        await self._confirm(topics, what)

    async def _confirm(self, wanted, what):
        """Read back each topic of ``wanted`` (``{topic: the Constraint published, or None
        for a removal}``) and raise NotKeptError, naming the likely cause, unless the
        broker holds exactly that: a publish the broker refused (an ACL; MQTT 3.1.1 has
        no way to say so) must not pass for one that is in force."""
        try:
            held = await self._read(list(wanted))
        except (PermissionError, TimeoutError) as exc:
            raise NotKeptError(f"could not read back {what} from the broker: {exc}",
                               next(iter(wanted))) from exc
        for topic, c in wanted.items():
            _, got, reason = _read_control(topic, held.get(topic, ""), self.prefix)
            if got == c:
                continue
            acl = (f"not authorised to write {topic}? (check the broker's ACL for this "
                   "user)")
            other = (f"a message engines reject ({reason})" if reason is not None
                     else None if got is None else f"{got.describe()}, id {got.id}")
            if c is None:
                raise NotKeptError(f"the broker did not take {what}: it still holds "
                                   f"{other}: {acl}; or another operator wrote it again "
                                   "meanwhile", topic)
            if other is None:
                raise NotKeptError(f"the broker did not keep {what}: {acl}", topic)
            raise NotKeptError(f"the broker did not keep {what}: it holds {other}: {acl}; "
                               "or another operator wrote it just after us", topic)

    async def pause(self, scope: str = "global", *, ttl: Optional[float] = None) -> Constraint:
        return await self._publish(Constraint.make(scope, "pause", ttl=ttl))

    # The broker's ramp is bounded (a retained message must not outlive its use): by
    # this when the engines' backlog cannot be read (no presence records), else by
    # RAMP_MARGIN seconds plus twice the time the fleet's waiting tasks take at the rate.
    RAMP_TTL = 3600.0
    RAMP_MARGIN = 60.0

    async def resume(self, scope: str = "global", *, ramp: Union[str, float, None] = None,
                     ttl: Optional[float] = None) -> Optional[Constraint]:
        """Clear the pause of ``scope`` on the broker. With ``ramp`` (``"10/s"``), first
        publish a retained ``ramp`` control on the scope (and read it back), then clear
        the pause: each engine starts its backlog at that pace and lifts its own
        application of the ramp once its backlog has gone through (an engine that
        applies it with no backlog, one that joins later, drops it at once). The
        retained message itself expires after ``ttl`` seconds, by default RAMP_MARGIN
        plus twice the time the engines' waiting tasks (from their presence records)
        take at that rate, or RAMP_TTL if there are none to read. Returns the ramp
        published, or None."""
        c = None
        if ramp is not None:
            Constraint.make(scope, "ramp", {"rate": ramp}, ttl=ttl)  # bad input: nothing sent
            if ttl is None:
                ttl = await self._ramp_ttl(_parse_rate(ramp))
            c = await self._publish(Constraint.make(scope, "ramp", {"rate": ramp}, ttl=ttl))
        await self._clear(scope, ("pause",), f"the resume of {scope}")
        return c

    async def _ramp_ttl(self, per_s):
        try:
            engines = [e for e in await self.engines() if not e["lost"]]
        except (PermissionError, TimeoutError):
            engines = []
        if not engines:
            return self.RAMP_TTL
        waiting = 0  # tasks waiting, of every scope: a bound of the ramp's backlog
        for e in engines:  # (records come off the wire: anything may be missing)
            runs = e.get("runs")
            for r in runs if isinstance(runs, list) else ():
                counts = r.get("counts") if isinstance(r, dict) else None
                n = counts.get("blocked") if isinstance(counts, dict) else None
                if _is_number(n) and n > 0:
                    waiting += n
        return min(_MAX_SECONDS, self.RAMP_MARGIN + 2 * waiting / per_s)

    async def adapt(self, scope: str, *, min: int = 1, max: int, on: Any = (),
                    latency: Optional[float] = None, factor: float = 0.5,
                    limit: Optional[int] = None, ttl: Optional[float] = None) -> Constraint:
        return await self._publish(Constraint.make(
            scope, "adaptive", _adapt_params(min, max, on, latency, factor, limit), ttl=ttl))

    async def drain(self, scope: str = "global", *, ttl: Optional[float] = None) -> Constraint:
        return await self._publish(Constraint.make(scope, "drain", ttl=ttl))

    async def undrain(self, scope: str = "global") -> None:
        await self._clear(scope, ("drain",), f"the undrain of {scope}")

    async def cancel(self, scope: str, *, timeout: Optional[float] = None) -> dict:
        """Cancel, once, the tasks matched by ``scope`` that have not finished, on every
        engine on the broker (see Engine.cancel): a one-shot command, not retained, so
        engines that join later and runs started later are not affected. Returns
        ``{engine id: tasks cancelled}`` of the engines that answered: it waits until
        every engine whose presence record shows active runs has answered, then a
        moment (0.25 s) for engines without a presence record, or at most ``timeout``
        seconds (default: the Controller's). An engine answers from each event loop it
        runs on (the counts are summed); empty: no engine heard it (none runs, or it
        cannot read ``<prefix>/commands/cancel`` or write ``<prefix>/acks/#``)."""
        scope = _check_scope(scope)
        timeout = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        busy = {r.get("engine_id") for r in await self.engines(timeout)
                if not r["lost"] and r.get("runs")}
        conn = await self._conn()
        cid = os.urandom(8).hex()
        acks, counts = f"{self.prefix}/acks/{cid}/#", {}
        heard = asyncio.Event()

        def collect(topic, payload):
            if isinstance(payload, dict) and isinstance(payload.get("engine_id"), str) \
                    and type(payload.get("cancelled")) is int:
                counts.setdefault(payload["engine_id"], {})[topic] = payload["cancelled"]
                heard.set()
        await conn.subscribe(acks, collect)
        try:
            await conn.publish(_cancel_topic(self.prefix), {"scope": scope, "id": cid}, qos=1)
            while not busy <= counts.keys() and loop.time() < deadline:
                heard.clear()
                try:
                    await asyncio.wait_for(heard.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            await asyncio.sleep(max(0.0, min(0.25, deadline - loop.time())))
        finally:
            await _maybe(conn, "unsubscribe", acks, collect)
        return {e: sum(by.values()) for e, by in sorted(counts.items())}

    async def limit(self, scope: str, n: int, *, per: Optional[str] = None,
                    overrides: Optional[dict] = None, fair: Optional[str] = None,
                    weights: Optional[dict] = None,
                    ttl: Optional[float] = None, shared: bool = False,
                    on_outage: Optional[str] = None) -> Constraint:
        return await self._publish(_limit_control(scope, n, per, overrides, fair, weights,
                                                  ttl, shared, on_outage))

    async def rate_limit(self, scope: str, rate: Union[str, float, list], *,
                         burst: Union[int, list, None] = None, weighted: bool = True,
                         per: Optional[str] = None, overrides: Optional[dict] = None,
                         ttl: Optional[float] = None, shared: bool = False,
                         on_outage: Optional[str] = None) -> Constraint:
        return await self._publish(_rate_control(scope, rate, burst, weighted, per,
                                                 overrides, ttl, shared, on_outage))

    async def clear(self, scope: str, type: Optional[str] = None) -> None:
        type = _check_type(type, "clear") if type else None
        await self._clear(scope, (type,) if type else _TYPES,
                          f"the clear of {type or 'every control'} on {scope}")

    async def _read(self, filters, timeout=None):
        """``{topic: payload}`` of what the broker holds on ``filters`` now. Subscribes,
        then makes a marker round trip on ``<prefix>/sync/<id>``: on one connection the
        broker sends a new subscription's retained messages before it routes our later
        marker back to us (a live message that comes meanwhile is newer, and wins).
        PermissionError if the broker refuses a subscription; TimeoutError, naming the
        sync topic's ACL, if the marker does not come back within ``timeout`` seconds."""
        conn = await self._conn()
        timeout = self.timeout if timeout is None else timeout
        held = {}
        marker = f"{self.prefix}/sync/{os.urandom(8).hex()}"
        done = asyncio.get_running_loop().create_future()

        @_latest_only
        def collect(topic, payload):
            if topic == marker:
                if not done.done():
                    done.set_result(None)
            elif payload == "":
                held.pop(topic, None)
            else:
                held[topic] = payload
        subscribed = []
        try:
            for f in (*filters, marker):
                await conn.subscribe(f, collect)
                subscribed.append(f)
            await conn.publish(marker, {"sync": marker}, qos=1)
            try:
                await asyncio.wait_for(done, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"the broker did not send back the marker on {marker} within "
                    f"{timeout:g}s: not authorised to read and write {self.prefix}/sync/#? "
                    "(check the broker's ACL for this user)") from None
        finally:
            for f in subscribed:
                await _maybe(conn, "unsubscribe", f, collect)
        return held

    async def retained(self, timeout: Optional[float] = None) -> dict:
        """Every control message the broker retains under ``<prefix>/constraints/``, as
        the engines see it (the same validation):

        - ``"in_force"``: the constraints an engine starting now applies, sorted by
          scope and type (what ``status()`` returns);
        - ``"expired"``: valid ones past their ``expires_at``, which every engine
          ignores (``clear`` removes them);
        - ``"rejected"``: ``{"topic", "reason"}`` of each message engines refuse, with
          the reason of their warning and ConstraintRejected event (a running engine
          keeps the last valid control it had of that topic).
        """
        now = time.time()
        found = {"in_force": [], "expired": [], "rejected": []}
        held = await self._read([f"{self.prefix}/constraints/#"], timeout)
        for topic, payload in sorted(held.items()):
            key, c, reason = _read_control(topic, payload, self.prefix)
            if reason is not None:
                found["rejected"].append({"topic": topic, "reason": reason})
            elif c is not None:
                past = c.expires_at is not None and c.expires_at <= now
                found["expired" if past else "in_force"].append(c)
        for part in ("in_force", "expired"):
            found[part].sort(key=lambda c: (c.scope, c.type))
        return found

    async def status(self, timeout: Optional[float] = None) -> list:
        """The constraints in force on the broker: those an engine starting now would
        apply, sorted by scope and type. Expired and rejected messages are left out
        (changed in 0.2: expired ones were listed); ``retained()`` gives them too."""
        return (await self.retained(timeout))["in_force"]

    async def engines(self, timeout: Optional[float] = None) -> list:
        """The presence records of the engines on the broker (under this prefix), sorted
        by org, project and engine id: each a dict (see the README's fleet view) with
        ``lost`` added, True when it has not been updated for 3 heartbeats (an engine
        that crashed, or lost its broker; clocks of engine and operator are compared)."""
        now, out = time.time(), []
        for topic, p in (await self._read([f"{self.prefix}/engines/#"], timeout)).items():
            if not isinstance(p, dict):
                continue
            rec = dict(p)
            at, beat = rec.get("updated_at"), rec.get("heartbeat")
            rec["lost"] = not (_is_number(at) and _is_number(beat)
                               and now - at <= _Presence.LOST * beat)
            rec.setdefault("engine_id", topic.rsplit("/", 1)[-1])
            out.append(rec)
        return sorted(out, key=lambda r: tuple(str(r.get(k)) for k in ("org", "project",
                                                                       "engine_id")))

    def __repr__(self):
        return f"<Controller {self.connector!r}>"

# ===========================================================================
# Stores: durable runs (checkpoints) and caching
# ===========================================================================

class _Miss:
    __slots__ = ()

    def __repr__(self):
        return "cs.MISS"

    def __reduce__(self):
        return "MISS"


MISS = _Miss()  # what a store's get returns for a key it does not hold (None is a value)


def _canon(value, out, depth=0):
    """Append to ``out`` a byte encoding of ``value`` that is the same in every process
    for equal values (unlike pickle or hash() of a set of str, which follow the per-process
    hash seed): the basis of the argument hash of a checkpoint or cache key. Plain values,
    containers of them (dicts and sets in a sorted order), dataclasses, and any other
    object by its pickle (a class instance pickles as its class and attributes). What
    cannot be pickled (a lock, a generator, a lambda) raises TypeError."""
    t = type(value)
    if t is str:
        out.append(b"s%d:" % len(value) + value.encode("utf-8", "surrogatepass"))
    elif t is int:  # in hex: a decimal str of an int over 4300 digits raises ValueError
        out.append(b"int:%x;" % value)
    elif t is bool or t is float or value is None:
        out.append(b"%s:%s;" % (t.__name__.encode(), repr(value).encode()))
    elif t is bytes:
        out.append(b"b%d:" % len(value) + value)
    elif depth > 50:
        raise TypeError("arguments nested more than 50 deep")
    elif t is list or t is tuple:
        out.append(b"L(" if t is list else b"T(")
        for v in value:
            _canon(v, out, depth + 1)
        out.append(b")")
    elif t is dict:
        items = []
        for k, v in value.items():
            ko, vo = [], []
            _canon(k, ko, depth + 1)
            _canon(v, vo, depth + 1)
            items.append((b"".join(ko), b"".join(vo)))
        out.append(b"D(" + b"".join(k + v for k, v in sorted(items)) + b")")
    elif t is set or t is frozenset:
        parts = []
        for v in value:
            o = []
            _canon(v, o, depth + 1)
            parts.append(b"".join(o))
        out.append(b"S(" + b"".join(sorted(parts)) + b")")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        out.append(f"C{t.__module__}.{t.__qualname__}(".encode())
        names = [f.name for f in dataclasses.fields(value)]
        extra = getattr(value, "__dict__", None)
        if extra is not None and len(extra) > len(names):  # attributes set besides its fields
            names += sorted(set(extra) - set(names))
        for name in names:
            out.append(b"s%d:" % len(name) + name.encode("utf-8", "surrogatepass") + b"=")
            v = getattr(value, name, _MISSING)
            if v is _MISSING:  # a field(init=False) not set
                out.append(b"unset;")
            else:
                _canon(v, out, depth + 1)
        out.append(b")")
    else:
        import pickle
        try:
            out.append(b"P" + pickle.dumps(value, protocol=4))
        except Exception as exc:
            raise TypeError(f"{type(value).__name__} object cannot be hashed for a store key "
                            f"(it cannot be pickled: {exc})") from None


def _args_hash(args, kwargs, where=b""):
    """A stable hash (hex) of a call's bound arguments (and ``where``: the bytes of the
    task's module and qualified name, so that two functions of the same task name never
    share a value): see _canon."""
    out = [where]
    if len(args) == 1 and not kwargs and type(args[0]) in (int, str):  # the common case
        a = args[0]
        out.append(b"s%d:" % len(a) + a.encode("utf-8", "surrogatepass") if type(a) is str
                   else b"int:%x;" % a)
    else:
        _canon(args, out)
        if kwargs:
            _canon(dict(kwargs), out)
    global _blake2b
    if _blake2b is None:  # imported on first use, not with the module (see the header)
        from hashlib import blake2b as _blake2b
    return _blake2b(b"".join(out), digest_size=16).hexdigest()


_blake2b = None


def _check_store(store, what="store"):
    if store is None:
        return None
    if not (callable(getattr(store, "get", None)) and callable(getattr(store, "put", None))):
        raise TypeError(f"{what}={store!r}: need an object with get(key) -> value or cs.MISS "
                        "and put(key, value, ttl=None) (sync or async), such as "
                        "cs.SqliteStore(path) or cs.RedisStore(client)")
    return store


def _sql(conn, sql, params=(), many=False):
    """Run one statement on a sqlite3 connection and return its rows, its cursor closed.
    A cursor left open keeps its statement active, and with it a lock on the file, until
    the cursor is collected: at once on CPython, whenever the GC runs on PyPy (another
    connection's next statement then failed with "database is locked")."""
    cur = conn.executemany(sql, params) if many else conn.execute(sql, params)
    try:
        return cur.fetchall()
    finally:
        cur.close()


class SqliteStore:
    """A store in a local SQLite file (the standard library's sqlite3, in WAL mode with
    synchronous=NORMAL), for checkpointed runs and ``with_cache``. Values are pickled: a
    local file is trusted (never point it at a file others can write). Values that cannot
    be pickled are not stored (one warning per type): their tasks run again next time.

    Reads happen on the caller's thread, each thread with its own connection; writes are
    queued and committed in batches by a writer thread (reads in this process see queued
    writes at once), and a run waits for its writes at its end. A process killed before a
    batch is committed loses it: those tasks run again (at-least-once). Expired entries
    (``ttl``) read as a miss. Several processes may share the file.

    ``timeout``: seconds a call may wait for the file's lock; ``strict=True``: a failing
    store fails the run instead of being turned off for it with a warning."""

    _inline = True  # a run calls it on its loop thread (its calls are local and quick)

    def __init__(self, path: Union[str, os.PathLike], *, timeout: float = 5.0,
                 strict: bool = False) -> None:
        if not (_is_number(timeout) and timeout > 0):
            raise ValueError(f"SqliteStore(timeout={timeout!r}): need seconds > 0")
        self.path = os.fspath(path)
        self.timeout, self.strict = float(timeout), bool(strict)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._queue = {}      # key -> (blob, expires): queued writes, read before the file
        self._writing = {}    # the batch being committed (read too, until it is)
        self._writer = None
        self._warned = set()
        self._error = None    # the writer's last error, raised by the next flush
        self._conn()          # the file can be opened and has its table: say so now

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            import sqlite3
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            _sql(conn, "PRAGMA journal_mode=WAL")
            _sql(conn, "PRAGMA synchronous=NORMAL")
            _sql(conn, "CREATE TABLE IF NOT EXISTS cascade_store (key TEXT PRIMARY KEY, "
                 "value BLOB NOT NULL, expires REAL)")
            self._local.conn = conn
        return conn

    def _found(self, row):
        blob, expires = row
        if expires is not None and expires <= time.time():
            return MISS
        return _unpickle(blob, self)

    def get(self, key: str) -> Any:
        row = self._queue.get(key) or self._writing.get(key)
        if row is None:
            rows = _sql(self._conn(), "SELECT value, expires FROM cascade_store WHERE key = ?",
                        (key,))
            if not rows:
                return MISS
            row = rows[0]
        return self._found(row)

    def get_many(self, keys: list) -> list:
        found = {}
        rest = []
        for k in keys:
            row = self._queue.get(k) or self._writing.get(k)
            if row is None:
                rest.append(k)
            else:
                found[k] = row
        conn = self._conn()
        for i in range(0, len(rest), 500):
            part = rest[i:i + 500]
            found.update((k, (v, e)) for k, v, e in _sql(
                conn, "SELECT key, value, expires FROM cascade_store WHERE key IN "
                f"({','.join('?' * len(part))})", part))
        return [MISS if row is None else self._found(row)
                for row in map(found.get, keys)]

    def put(self, key: str, value: Any, ttl: Optional[float] = None) -> None:
        self.put_many([(key, value, ttl)])

    def put_many(self, items: list) -> None:
        import pickle
        rows = []
        now = None
        for key, value, ttl in items:
            try:
                blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                self._warn_once(type(value), f"SqliteStore: a {type(value).__name__} value "
                                f"cannot be pickled ({exc}); such values are not stored "
                                "(their tasks run again next time)")
                continue
            if ttl is not None:
                now = now or time.time()
            rows.append((key, (blob, None if ttl is None else now + ttl)))
        if not rows:
            return
        with self._lock:
            self._queue.update(rows)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, daemon=True,
                                                name="cascade-sqlite-writer")
                self._writer.start()
            else:
                self._done.notify_all()

    def _warn_once(self, what, message):
        if what not in self._warned:
            self._warned.add(what)
            _log.warning("%s", message)

    def _write(self):
        """The writer thread: commits what is queued, a batch per transaction; leaves
        after a second with nothing to write (the next put starts another)."""
        conn = None
        while True:
            with self._lock:
                if not self._queue:
                    self._done.wait(1.0)
                    if not self._queue:
                        self._writer = None
                        self._done.notify_all()
                        break
                self._writing, self._queue = self._queue, {}
                batch = self._writing
            try:
                if conn is None:
                    conn = self._conn()
                _sql(conn, "BEGIN IMMEDIATE")
                _sql(conn, "INSERT OR REPLACE INTO cascade_store VALUES (?, ?, ?)",
                     [(k, b, e) for k, (b, e) in batch.items()], many=True)
                _sql(conn, "COMMIT")
            except Exception as exc:
                self._error = exc
                try:
                    _sql(conn, "ROLLBACK")
                except Exception:
                    pass
            with self._lock:
                self._writing = {}
                self._done.notify_all()
        if conn is not None:
            conn.close()
            self._local.conn = None

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every write made so far is committed (raises what committing
        raised, or TimeoutError after ``timeout`` seconds)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._writing:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"SqliteStore({self.path!r}): writes not committed "
                                       f"within {timeout}s")
                self._done.wait(left)
            exc, self._error = self._error, None
        if exc is not None:
            raise exc

    def __repr__(self):
        return f"<SqliteStore {self.path!r} {len(self._queue) + len(self._writing)} queued>"


class RedisStore:
    """A store in Redis, on a redis-py client you made (``redis.Redis(...)`` or
    ``redis.asyncio.Redis(...)``; cascade never imports redis itself). Keys are
    ``<prefix>:<key>``; a ``ttl`` becomes the key's expiry.

    Values: with ``secret`` (bytes), any picklable value, pickled and signed with
    HMAC-SHA256 over key and value; a value whose signature does not verify (tampered,
    or written with another secret) is never unpickled: it reads as a miss, with one
    warning. Without a secret only JSON values are stored, and only those that read back
    equal (so not tuples or sets): any other value is not stored (one warning per type),
    and its task runs again next time; a pickled value is then never read.

    ``timeout``: seconds a run gives each call; ``strict=True``: a failing store fails the
    run instead of being turned off for it with a warning."""

    def __init__(self, client: Any, *, secret: Optional[bytes] = None, prefix: str = "cascade",
                 timeout: float = 5.0, strict: bool = False) -> None:
        if not callable(getattr(client, "execute_command", None)) or not callable(
                getattr(client, "mget", None)):
            raise TypeError(f"RedisStore(client={client!r}): need a redis-py client, e.g. "
                            "redis.Redis(host='localhost') or redis.asyncio.Redis(...)")
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise TypeError("RedisStore(secret=...): need bytes, at least 16 of them (e.g. "
                            "os.urandom(32), kept where every process can read it)")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"RedisStore(prefix={prefix!r}): need a non-empty str")
        if not (_is_number(timeout) and timeout > 0):
            raise ValueError(f"RedisStore(timeout={timeout!r}): need seconds > 0")
        self.client, self.prefix = client, prefix
        self._secret = secret
        self.timeout, self.strict = float(timeout), bool(strict)
        self._warned = set()
        self._loop = None  # (an asyncio client's: the loop its connections were made on)
        if inspect.iscoroutinefunction(client.execute_command):
            self.get, self.get_many = self._aget, self._aget_many
            self.put, self.put_many = self._aput, self._aput_many

    def _sign(self, key, blob):
        import hashlib
        import hmac
        return hmac.new(self._secret, key.encode() + b"\0" + blob, hashlib.sha256).digest()

    def _encode(self, key, value):
        if self._secret is not None:
            import pickle
            try:
                blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                return self._warn_once(type(value), f"RedisStore: a {type(value).__name__} "
                                       f"value cannot be pickled ({exc}); not stored")
            return b"p" + self._sign(key, blob) + blob
        try:
            text = json.dumps(value, allow_nan=False)
            same = json.loads(text) == value and _json_exact(value)
        except (TypeError, ValueError):
            same = False
        if not same:
            return self._warn_once(type(value), f"RedisStore: a {type(value).__name__} value "
                                   "is not JSON that reads back equal; without a secret only "
                                   "such values are stored (pass secret= to store pickles)")
        return b"j" + text.encode()

    def _decode(self, key, raw):
        if raw is None:
            return MISS
        raw = bytes(raw) if not isinstance(raw, bytes) else raw
        if self._secret is not None:  # only a value this secret signed is read
            if raw[:1] == b"p":
                sig, blob = raw[1:33], raw[33:]
                import hmac
                if hmac.compare_digest(sig, self._sign(key, blob)):
                    return _unpickle(blob, self)
            self._warn_once("signature", f"RedisStore: the value under {key!r} has a bad "
                            "signature (tampered, unsigned, or written with another secret): "
                            "not read, a miss (later ones are not logged)")
            return MISS
        if raw[:1] == b"j":
            try:
                return json.loads(raw[1:])
            except ValueError:  # (UnicodeDecodeError too)
                self._warn_once("json", f"RedisStore: the value under {key!r} is not valid "
                                "JSON (truncated or tampered): a miss (later ones are not "
                                "logged)")
                return MISS
        self._warn_once("unsigned", f"RedisStore: the value under {key!r} is not a JSON "
                        "value of this store (a pickle, and this store has no secret to "
                        "verify it, or foreign): not read, a miss")
        return MISS

    def _warn_once(self, what, message):
        if what not in self._warned:
            self._warned.add(what)
            _log.warning("%s", message)

    def _full(self, key):
        return f"{self.prefix}:{key}"

    def _pipeline(self, items):
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for key, value, ttl in items:
            full = self._full(key)
            data = self._encode(full, value)
            if data is not None:
                pipe.set(full, data, px=None if ttl is None else max(1, int(ttl * 1000)))
                n += 1
        return pipe if n else None

    def get(self, key: str) -> Any:
        full = self._full(key)
        return self._decode(full, self.client.get(full))

    def get_many(self, keys: list) -> list:
        full = [self._full(k) for k in keys]
        return [self._decode(k, v) for k, v in zip(full, self.client.mget(full))]

    def put(self, key: str, value: Any, ttl: Optional[float] = None) -> None:
        self.put_many([(key, value, ttl)])

    def put_many(self, items: list) -> None:
        pipe = self._pipeline(items)
        if pipe is not None:
            pipe.execute()

    def _this_loop(self):
        """An asyncio client's connections belong to the loop that made them: when that
        loop has closed (the last ``cs.run``'s), its pool forgets them (without closing:
        a closed loop cannot), so the next run makes its own (regression: every run after
        the first turned the store off, "Event loop is closed")."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            old, self._loop = self._loop, loop
            pool = getattr(self.client, "connection_pool", None)
            if old is not None and old.is_closed() and callable(getattr(pool, "reset", None)):
                pool.reset()

    async def _aget(self, key):
        self._this_loop()
        full = self._full(key)
        return self._decode(full, await self.client.get(full))

    async def _aget_many(self, keys):
        self._this_loop()
        full = [self._full(k) for k in keys]
        return [self._decode(k, v) for k, v in zip(full, await self.client.mget(full))]

    async def _aput(self, key, value, ttl=None):
        await self._aput_many([(key, value, ttl)])

    async def _aput_many(self, items):
        self._this_loop()
        pipe = self._pipeline(items)
        if pipe is not None:
            await pipe.execute()

    def __repr__(self):
        return f"<RedisStore prefix={self.prefix!r} {'signed pickles' if self._secret else 'json'}>"


def _unpickle(blob, store):
    """A stored value (a trusted pickle), or MISS with one warning a store when it cannot
    be loaded (its class was renamed or moved, or its module is not importable here): a
    value the code no longer reads is not a failure of the store."""
    import pickle
    try:
        return pickle.loads(blob)
    except Exception as exc:
        store._warn_once("unpickle", f"{type(store).__name__}: a stored value cannot be "
                         f"loaded ({type(exc).__name__}: {_printable(exc)}): a miss, its task "
                         "runs (later ones are not logged)")
        return MISS


def _json_exact(value):
    """JSON reads back ``value`` as it was: no tuples (lists come back), no non-str keys."""
    t = type(value)
    if t is list:
        return all(map(_json_exact, value))
    if t is dict:
        return all(type(k) is str and _json_exact(v) for k, v in value.items())
    return t in (str, int, float, bool) or value is None


class _Stored:
    """A run's use of its store: lookups before admission, writes after success. A store
    that raises or takes longer than its ``timeout`` turns off for the rest of the run
    with one warning (its tasks simply run), or fails the run if it is ``strict``. Our
    SqliteStore is called on the loop (quick, local calls bounded by its lock timeout);
    any other sync store on worker threads with a bound, an async one under wait_for."""

    def __init__(self, run, store):
        self.run, self.store = run, store
        self.strict = bool(getattr(store, "strict", False))
        t = getattr(store, "timeout", 5.0)
        self.timeout = float(t) if _is_number(t) and t > 0 else 5.0
        self.inline = bool(getattr(type(store), "_inline", False))
        self.off = False
        self.error = None       # a strict store's failure
        get_many = getattr(store, "get_many", None)
        put_many = getattr(store, "put_many", None)
        self.get_many = get_many if callable(get_many) else None
        self.put_many = put_many if callable(put_many) else None
        self.aget = inspect.iscoroutinefunction(self.get_many or store.get)
        self.aput = inspect.iscoroutinefunction(self.put_many or store.put)
        self.threads = None
        self.puts = []          # (key, value, ttl) not handed to the store yet
        self.writing = set()    # asyncio tasks of writes under way
        self.warned = set()

    def failed(self, exc, what):
        """The store failed: turn it off for this run (one warning), or fail the run."""
        if self.off:
            return
        self.off = True
        self.puts.clear()
        if self.strict:
            err = self.error = CascadeError(f"the store {self.store!r} failed ({what}): "
                               f"{type(exc).__name__}: {exc}")
            err.__cause__ = exc
            run = self.run
            if run.error is None:
                run.error = err
            return run._stop()
        _log.warning("run %s: the store %r failed (%s: %s: %s); the run goes on without it "
                     "(strict=True on the store fails the run instead)", self.run.run_id,
                     self.store, what, type(exc).__name__, _printable(exc))

    def _sync_get(self, keys, began=None):
        """(``began``: for a store thread, ``[monotonic time]`` of the store call under
        way, kept up to date: see _bounded.)"""
        if began is None:
            began = [0.0]
        if self.get_many is not None:
            began[0] = time.monotonic()
            values = self.get_many(keys)
        else:
            values = []
            for k in keys:
                began[0] = time.monotonic()
                values.append(self.store.get(k))
        if len(values) != len(keys):
            raise TypeError(f"get_many returned {len(values)} values for {len(keys)} keys")
        return values

    async def _aget_all(self, keys):
        if self.get_many is not None:
            values = await self.get_many(keys)
        else:
            values = [await self.store.get(k) for k in keys]
        if len(values) != len(keys):
            raise TypeError(f"get_many returned {len(values)} values for {len(keys)} keys")
        return values

    def _sync_put(self, items, began=None):
        if began is None:
            began = [0.0]
        if self.put_many is not None:
            began[0] = time.monotonic()
            self.put_many(items)
        else:
            for k, v, ttl in items:
                began[0] = time.monotonic()
                self.store.put(k, v, ttl)

    async def _aput_all(self, items):
        if self.put_many is not None:
            await self.put_many(items)
        else:
            for k, v, ttl in items:
                await self.store.put(k, v, ttl)

    async def _on_thread(self, fn, arg):
        """``fn(arg, began)`` on a store thread; TimeoutError once one store call of it
        has run for longer than the timeout. The time it waits for a thread does not
        count (calls queued behind each other were taken for a hung store), nor does a
        call after the one before it (a batch of many puts, each quick); if the store
        is turned off meanwhile (another call failed), it is not waited for."""
        if self.threads is None:
            self.threads = _Workers(4, prefix="cascade-store")
        began = [None]
        fut = asyncio.wrap_future(self.threads.submit(fn, arg, began))
        while True:
            at = began[0]
            left = self.timeout if at is None else at + self.timeout - time.monotonic()
            if left <= 0 or (self.off and at is None):
                fut.cancel()  # (not begun: never will)
                raise asyncio.TimeoutError()
            done, _ = await asyncio.wait((fut,), timeout=left)
            if done:
                return fut.result()

    def get_now(self, keys):
        """An inline store's values for ``keys`` (None: the store failed)."""
        try:
            return self._sync_get(keys)
        except Exception as exc:
            self.failed(exc, "get")
            return None

    async def get(self, keys):
        """The values for ``keys`` (None: the store failed or took too long)."""
        try:
            if self.aget:
                values = await asyncio.wait_for(self._aget_all(keys), self.timeout)
            else:
                values = await self._on_thread(self._sync_get, keys)
            if not self.aget and values and inspect.isawaitable(values[0]):
                for v in values:
                    getattr(v, "close", lambda: None)()
                raise TypeError("its get returned an awaitable: make get (and get_many) "
                                "'async def', so that it is awaited")
            return values
        except asyncio.TimeoutError as exc:
            self.failed(TimeoutError(f"no answer within {self.timeout:g}s") if not str(exc)
                        else exc, "get")
        except Exception as exc:
            self.failed(exc, "get")
        return None

    def put(self, key, value, ttl):
        """Write soon: the writes of a loop iteration go to the store together; an
        inline store's at once (SqliteStore pickles then: a later body may change a
        value it was given, which must not change what was recorded)."""
        if self.off:
            return
        if self.inline:
            try:
                self._sync_put(((key, value, ttl),))
            except Exception as exc:
                self.failed(exc, "put")
            return
        if not self.puts:
            self.run.loop.call_soon(self._write)
        self.puts.append((key, value, ttl))

    WRITERS = 3  # writes under way at once; those made meanwhile wait and go together

    def _write(self):
        if len(self.writing) >= self.WRITERS:
            return  # (_wrote sends them: a store far away gets few large batches)
        items, self.puts = self.puts, []
        if not items or self.off:
            return
        t = self.run.loop.create_task(self._put(items))
        self.writing.add(t)
        t.add_done_callback(self._wrote)

    def _wrote(self, t):
        self.writing.discard(t)
        if self.puts:
            self._write()

    async def _put(self, items):
        try:
            if self.aput:
                await asyncio.wait_for(self._aput_all(items), self.timeout)
            else:
                await self._on_thread(self._sync_put, items)
        except asyncio.TimeoutError:
            self.failed(TimeoutError(f"no answer within {self.timeout:g}s"), "put")
        except Exception as exc:
            self.failed(exc, "put")

    async def close(self):
        """At the run's end: the writes handed over are done, and an inline store's
        committed (or the store is off). Returns the error of a strict store that failed
        meanwhile (its run fails with it), else None."""
        self._write()
        try:
            while self.writing:  # (a write's end sends those made meanwhile)
                await asyncio.wait(list(self.writing))
            store = self.store
            # (a batch that failed to commit before now has left its error there)
            if not self.off and self.inline and (store._queue or store._writing
                                                 or store._error is not None):
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                    None, self.store.flush, self.timeout), self.timeout + 1)
        except Exception as exc:
            self.failed(exc, "flush")
        finally:
            if self.threads is not None:
                self.threads.shutdown(wait=False)
        return self.error


# ===========================================================================
# Engine: events, the per-run scheduler, handles, the Engine
# ===========================================================================

# Events are frozen dataclasses. Their __repr__/__eq__ come from Event instead of being
# generated per class: dataclasses builds each generated method with exec(), and doing
# that for fourteen classes was most of the cost of `import cascade`.
_event = dataclasses.dataclass(frozen=True, repr=False, eq=False)


@_event
class Event:
    """Base of every event; ``engine.subscribe(cs.Event, cb)`` receives them all."""
    run_id: str

    def _values(self):
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)

    def __repr__(self):
        return f"{type(self).__name__}(" + ", ".join(
            f"{f}={getattr(self, f)!r}" for f in self.__dataclass_fields__) + ")"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self):
        return hash((type(self).__name__, self.run_id))


@_event
class RunStarted(Event):
    target_tasks: tuple
    params: dict = dataclasses.field(hash=False)


@_event
class RunFinished(Event):
    status: str                 # "Succeeded" | "Failed" | "Cancelled"
    duration: float
    error: BaseException = None


@_event
class TaskExecutionStarted(Event):
    task_id: str
    task_name: str


@_event
class TaskExecutionFinished(Event):
    task_id: str
    task_name: str
    status: str                 # "Succeeded" | "Failed"
    duration: float
    error: BaseException = None


@_event
class TaskSkipped(Event):
    task_id: str
    task_name: str
    reason: str


@_event
class TaskCached(Event):
    """A task execution (a call, or a map's item) took its value from the store without
    running its body: ``source`` is "cache" (``with_cache``) or "checkpoint" (it finished
    in an earlier run with this run's id)."""
    task_id: str
    task_name: str
    source: str


@_event
class TaskRetrying(Event):
    task_id: str
    task_name: str
    attempt: int                # the attempt that just failed, from 1
    max_attempts: int
    delay: float
    error: BaseException


@_event
class TaskBlocked(Event):
    task_id: str
    task_name: str
    reason: str                 # names the scope and type that holds it


@_event
class ResourceAcquired(Event):
    resource_name: str


@_event
class ResourceReleased(Event):
    resource_name: str


@_event
class ConstraintApplied(Event):
    constraint: Constraint


@_event
class ConstraintRemoved(Event):
    constraint: Constraint


@_event
class ConstraintRejected(Event):
    topic: str
    reason: str


@_event
class CoordinatorOutage(Event):
    """A shared control's coordinator (Redis) could not be reached: the control does
    what its ``on_outage`` says until a CoordinatorRecovered event."""
    constraint: Constraint
    reason: str


@_event
class CoordinatorRecovered(Event):
    """A shared control's coordinator answers again: the control is fleet-wide again."""
    constraint: Constraint


class _Bus:
    """In-process event bus. Callbacks run synchronously in the emitting thread: run
    events on the run's loop thread, constraint events in the thread that changed the
    constraint. A raising subscriber is logged and never breaks the run."""

    def __init__(self):
        self._subs = {}
        self._cache = {}
        self._lock = threading.Lock()
        self.version = 0  # bumped on every (un)subscribe: runs cache what they need

    def subscribe(self, etype, callback):
        if not (isinstance(etype, type) and issubclass(etype, Event)):
            raise TypeError(f"subscribe() needs an event class such as cs.TaskBlocked or "
                            f"cs.Event (for all), got {etype!r}")
        if not callable(callback):
            raise TypeError(f"subscribe() needs a callable callback(event), got {callback!r}")
        with self._lock:
            self._subs.setdefault(etype, []).append(callback)
            self._cache = {}
            self.version += 1

        def unsubscribe():
            with self._lock:
                try:
                    self._subs[etype].remove(callback)
                except (KeyError, ValueError):
                    return
                self._cache = {}
                self.version += 1
        return unsubscribe

    def wants(self, etype):
        cbs = self._cache.get(etype)
        if cbs is None:
            with self._lock:
                cbs = tuple(cb for cls in etype.__mro__ for cb in self._subs.get(cls, ()))
                self._cache[etype] = cbs
        return cbs

    def exactly(self, etype):
        """The subscribers of ``etype`` itself (not of its bases)."""
        with self._lock:
            return tuple(self._subs.get(etype, ()))

    def emit(self, event):
        self.deliver(self.wants(type(event)), event)

    @staticmethod
    def deliver(callbacks, event):
        for cb in callbacks:
            try:
                r = cb(event)
                if r is not None and inspect.isawaitable(r):
                    asyncio.ensure_future(r)
            except Exception:
                _log.exception("event subscriber %r failed on %s", cb, type(event).__name__)


class _TaskFailures(Event):
    """Subscribing to this (private) class receives the failed TaskExecutionFinished
    events only: cs.run's log at WARNING and above needs no event per success."""


# Unit states, which are also the cells of a run's per-task tally (see _Unit).
(_PENDING, _WAITING, _GRANTED, _RUNNING, _RETRYING, _DONE, _FAILED, _DROPPED,
 _SKIPPED, _CACHED) = range(10)
_STATE_NAMES = ("pending", "blocked", "granted", "running", "retrying", "done", "failed",
                "dropped", "skipped", "cached")


def _tally_counts(t):
    """The {state name: count} of a tally (the GRANTED cell counts running units too)."""
    out = {}
    for i, name in enumerate(_STATE_NAMES):
        n = t[i] - t[_RUNNING] if i == _GRANTED else t[i]
        if n > 0 and i != _DROPPED:
            out[name] = n
    return out


class _Unit:
    """One task execution (a call, or one item of a map): the thing admission grants.

    Its life, and the only methods that change ``state``::

        PENDING --enqueue--> WAITING --admit: grant()--> GRANTED --gate: begin()--> RUNNING
           |                 ^   ^                       |   |                       |
           +--(nothing to decide: grant_all)-------------+   |   end(): DONE | FAILED | RETRYING
                             |   +--(a late pause at the gate: wait())--+            |
                             +--(after the retry delay: wait_all())------------------+
        WAITING or GRANTED --(the run stops: drop())--> DROPPED
        WAITING, DROPPED, RETRYING or a body's end --(engine.cancel: see _Run.cancel)--> SKIPPED

    Each transition also moves the unit between the cells of its task's tally in the
    run, so status costs what it shows. Every cell has one writer side, so no cell is
    ever updated from two threads at once: WAITING, GRANTED (granted or running) and
    DROPPED change under the control-plane lock; PENDING, RUNNING, RETRYING, DONE and
    FAILED on the run's loop thread (a sync body's start is counted when the loop hears
    of it). Leaving GRANTED/RUNNING is two halves: ``_ControlPlane.release`` (lock side)
    then ``end`` (loop side). On a remote executor (see _Remote) RUNNING means handed
    over (its gate passed on the loop; ``body`` is its future), shown as "submitted"."""
    __slots__ = ("run", "node", "index", "args", "kwargs", "attempt", "seq", "state", "held",
                 "reported", "body")

    def __init__(self, run, node, index, args, kwargs):
        self.run, self.node, self.index = run, node, index
        self.args, self.kwargs = args, kwargs
        self.attempt = 1
        self.seq = node.seq if index is None else node.seq + index  # readiness order
        self.state = _PENDING
        self.held = ()           # [(state object, amount)] reserved at grant
        self.reported = False    # TaskBlocked was emitted for the current wait
        self.body = None         # the asyncio task of its async body while it runs

    @staticmethod
    def wait_all(units):  # lock held, loop thread: a node's fresh units, or one retry
        t, n = units[0].node.tally, len(units)
        t[units[0].state] -= n
        t[_WAITING] += n
        for u in units:
            u.state = _WAITING
            u.reported = False

    @staticmethod
    def grant_all(units):  # lock held, loop thread: fresh units or a retry, no waiting
        t, n = units[0].node.tally, len(units)
        t[units[0].state] -= n
        t[_GRANTED] += n
        for u in units:
            u.state = _GRANTED

    def grant(self):  # lock held: WAITING -> GRANTED
        t = self.node.tally
        t[_WAITING] -= 1
        t[_GRANTED] += 1
        self.state = _GRANTED

    def wait(self):  # lock held: GRANTED -> WAITING (a pause came after the grant)
        t = self.node.tally
        t[_GRANTED] -= 1
        t[_WAITING] += 1
        self.state = _WAITING
        self.reported = False

    def begin(self):  # the body's thread, just before the body: GRANTED -> RUNNING
        self.state = _RUNNING

    def end(self, state):  # loop thread, after release: -> DONE | FAILED | RETRYING
        t = self.node.tally
        if self.state == _RUNNING:
            t[_RUNNING] -= 1
        t[state] += 1
        self.state = state

    def drop(self):  # lock held: WAITING | GRANTED -> DROPPED (its run is stopping)
        t = self.node.tally
        t[self.state] -= 1
        t[_DROPPED] += 1
        self.state = _DROPPED

    def cut(self):  # lock held, loop thread: WAITING | DROPPED -> SKIPPED (engine.cancel)
        t = self.node.tally
        t[self.state] -= 1
        t[_SKIPPED] += 1
        self.state = _SKIPPED

    # Derived, not stored: a map of 100,000 items makes 100,000 units.
    @property
    def id(self):
        return self.node.id if self.index is None else f"{self.node.id}[{self.index}]"

    @property
    def key(self):
        return self.node.key

    def __repr__(self):
        return f"<_Unit {self.id} {_STATE_NAMES[self.state]}>"


class _Weighted(_Unit):
    """A unit of a task whose cost is a function of its arguments (see ``task``): its
    admission key is its own, the key of its cost (see _Run._submit_weighted)."""
    __slots__ = ("key",)

    @classmethod
    def of(cls, u, key):  # (a fresh unit: what _Unit.__init__ sets, and its key)
        w = cls.__new__(cls)
        w.run, w.node, w.index, w.args, w.kwargs = u.run, u.node, u.index, u.args, u.kwargs
        w.attempt, w.seq, w.state, w.held = u.attempt, u.seq, u.state, u.held
        w.reported, w.body = u.reported, u.body
        w.key = key
        return w


class _Overdue(_Unit):
    """The attempt of a sync unit whose body runs on past its timeout (see
    ``_Run._overdue``): it holds that attempt's slots until the body returns, while the
    unit itself has moved on (failed, or waits for its retry). Its admission key is the
    unit's (a keyed call's has its key values), so that a limit set meanwhile counts
    it where it counts the unit (regression: a per-key limit set while a keyed body ran
    on past its timeout let a second body of that value start beside it)."""
    __slots__ = ("back", "key")

    def __init__(self, run, node, index, args, kwargs, key):
        super().__init__(run, node, index, args, kwargs)
        self.state = _RUNNING
        self.back = False  # its body returned before its run abandoned it
        self.key = key


_IN_TIME, _RETURNED, _LATE = range(3)  # _Deadline.state


class _Deadline:
    """A sync body's timeout (see ``_Run._start_timed``). ``state`` moves once, under
    the run's ``_late`` lock, from _IN_TIME to _RETURNED (the body returned first) or
    to _LATE (the deadline came first: ``ghost`` holds the slots)."""
    __slots__ = ("unit", "seconds", "t0", "handle", "state", "ghost")

    def __init__(self, unit, seconds):
        self.unit, self.seconds = unit, seconds
        self.t0 = 0.0
        self.handle = None  # the loop's timer, once armed
        self.state = _IN_TIME
        self.ghost = None


def _timed_out(u, seconds):
    return TimeoutError(f"task {u.key.name!r} ({u.id}) timed out: its attempt "
                        f"{u.attempt} took more than with_timeout({seconds:g}) seconds")


_STARTED, _REFUSED = object(), object()  # messages from worker threads


class _Workers(concurrent.futures.Executor):
    """The engine's own pool for sync bodies and sync resources: at most ``max_workers``
    threads, started on demand and reused while idle (as ThreadPoolExecutor does).

    Its threads are daemon threads: a body that never returns does not keep the process
    alive at exit (ThreadPoolExecutor joins its threads at exit, so one stuck body hung
    the process for good). ``call`` runs a function and makes no future (the engine's
    bodies report back through their run); ``submit`` is the Executor API, for
    ``run_in_executor``.

    A run that abandons bodies still running here (see ``_Run._abandon``) writes their
    threads off with ``abandon``: the pool starts replacements, so the threads that
    serve never number more than ``max_workers`` and none of them is stuck. A call that
    returns ``_LEAVE`` (an abandoned body that returned at last) ends its thread."""

    def __init__(self, max_workers, prefix="cascade-worker"):
        self.max_workers = max_workers
        self._prefix = prefix
        self._jobs = queue.SimpleQueue()     # (fn, args), or None: stop
        self._idle = threading.Semaphore(0)  # released by a thread each time it goes idle
        self._lock = threading.Lock()
        self._serving = 0                    # invariant: <= max_workers (abandoned: not counted)
        self._started = 0                    # for thread names
        self._threads = set()
        self._shutdown = False

    def call(self, fn, *args):
        """Run ``fn(*args)`` in a worker thread; what it raises is logged."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        self._jobs.put((fn, args))
        # an idle thread takes it; else a new one, while fewer than max_workers serve
        if self._serving < self.max_workers and not self._idle.acquire(blocking=False):
            self._grow(1)

    def submit(self, fn, /, *args, **kwargs):
        f = concurrent.futures.Future()
        self.call(_into_future, f, fn, args, kwargs)
        return f

    def abandon(self, n):
        """``n`` of the threads run bodies that their run gave up on: replace them (each
        ends when its body returns ``_LEAVE``)."""
        with self._lock:
            self._serving -= n
        self._grow(n)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop the threads once the calls queued before have run (an abandoned body's
        thread: once it returns). ``wait`` joins them, so it waits for such a body too."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        self._jobs.put(None)  # each thread that takes it puts it back for the next
        if wait:
            for t in threads:
                t.join()

    def _grow(self, n):
        with self._lock:
            while n > 0 and self._serving < self.max_workers and not self._shutdown:
                t = threading.Thread(target=self._work, name=f"{self._prefix}_{self._started}",
                                     daemon=True)
                self._threads.add(t)
                self._started += 1
                self._serving += 1
                n -= 1
                t.start()

    def _work(self):
        get, idle = self._jobs.get, self._idle.release
        while True:
            job = get()
            if job is None:
                self._jobs.put(None)
                break
            try:
                if job[0](*job[1]) is _LEAVE:
                    break
            except BaseException:  # a worker outlives whatever its call lets out
                _log.exception("a call in worker thread %s raised",
                               threading.current_thread().name)
            del job  # its arguments go now, not when the next job comes
            idle()
        with self._lock:
            self._threads.discard(threading.current_thread())

    def __repr__(self):
        return (f"<_Workers {self._serving}/{self.max_workers} serving, "
                f"{len(self._threads) - self._serving} abandoned"
                f"{', shut down' if self._shutdown else ''}>")


_LEAVE = object()  # returned by a call to end its worker thread (see _Workers)


def _into_future(f, fn, args, kwargs):
    if not f.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        f.set_exception(exc)
    else:
        f.set_result(result)


def _call_task(fn, args, kwargs, name=None, check=None):
    # What a remote executor (process pool, Dask) runs: the body (``fn``: the task, sent
    # by name, or its function; see _Remote.wires), then, with ``check``, a check that its
    # value can be sent back (regression: on Dask an unpicklable value hung the run).
    value = (fn.fn if isinstance(fn, Task) else fn)(*args, **kwargs)
    if check is not None:
        _check_sendable(value, name, check)
    return value


class _Discard:
    # A file that keeps nothing: _check_sendable pickles for the error alone.
    def write(self, data):
        return len(data)

    @staticmethod
    def buffer(buf):  # buffer_callback: None keeps a buffer out of band (not copied)
        return None


def _check_sendable(value, name, how):
    """In the worker: can ``value`` be sent back as the executor will send it? Costs one
    serialization more; large buffers (numpy arrays, PickleBuffer) are not copied."""
    try:
        if how == "dask":
            from distributed.protocol import serialize  # runs on a Dask worker only
            serialize(value, on_error="raise")
        else:
            import pickle
            from multiprocessing.reduction import ForkingPickler  # what a pool sends with
            ForkingPickler(_Discard(), pickle.HIGHEST_PROTOCOL, True, _Discard.buffer).dump(value)
    except Exception as exc:
        raise TypeError(f"task {name!r} returned a {type(value).__name__} that cannot be "
                        f"pickled to send it back from the executor ({type(exc).__name__}: "
                        f"{exc}); return plain data, or make its type picklable") from None
    return True


class _Remote:
    """How a run hands sync bodies to an executor that runs them elsewhere: a process
    pool, a Dask cluster (``_Dask``), or any other Executor but a thread pool.

    The invariant: at any instant, the sync bodies an engine has handed to its executor
    and not yet seen finish number at most its window (a ``_Window``: a capacity each one
    takes at its grant and gives back when its future completes), and each was handed
    over right after passing the start gate on its run's loop. So a pause, a limit, a
    failure and a cancel act on everything not handed over; what was handed over and
    has not begun when a run fails or is cancelled is cancelled (on Dask even what
    runs), and the rest runs to its end (at most the window). Every call and every retry
    is its own remote call. A body cannot report when a worker begins it, so status
    counts a handed-over body as ``submitted``, never as ``running``.

    ``check``: how a worker checks that a value can be sent back (None: it does not);
    ``probes``: whether a run, before any body, sends each distinct sync task to a
    worker and has it loaded there inside a call (see _Run._check_remote); ``sized``:
    whether the window's default size is read afresh when each run starts."""
    check = None
    probes = False
    sized = False

    def __init__(self, executor, name=None):
        self.executor = executor
        self.name = name or type(executor).__name__

    def slots(self):
        """The window's default size: the executor's workers (blocking: not on a loop)."""
        n = getattr(self.executor, "_max_workers", None)
        ok = isinstance(n, int) and not isinstance(n, bool) and n > 0
        return n if ok else (os.cpu_count() or 1)

    def wires(self, task):
        """What may be sent to run ``task``'s body, best first (a run sends the first
        that a worker loads): the task itself where its name finds it (a worker imports
        its module), else its function (pickled as the executor pickles)."""
        return (task,) if _by_name(task) else (task.fn,)

    def dumps(self, obj):
        import pickle
        return pickle.dumps(obj)

    def probe(self, blob, label):
        """A future of ``pickle.loads(blob)`` run by a worker: a blob that cannot be
        loaded fails that call, and nothing else (loaded by the pool itself, it broke the
        pool: BrokenProcessPool, the cause only on the child's stderr). ``label``: a name
        for it, where the executor shows one."""
        import pickle
        return self.executor.submit(pickle.loads, blob)

    def submit(self, u, fn, args, kwargs):
        """Hand a body over; returns a concurrent.futures.Future of its value."""
        return self.executor.submit(_call_task, fn, args, kwargs, u.key.name, self.check)

    def cancel(self, futures):
        for f in futures:  # a pool's future that a worker has taken is not cancelled
            f.cancel()

    def explain(self, exc, u):
        """The error to report for a body whose future failed by the executor's doing: a
        bare CancelledError says nothing, so it becomes a CascadeError that names it."""
        if not isinstance(exc, (concurrent.futures.CancelledError, asyncio.CancelledError)):
            return exc
        why = ("the run stopped" if u.run.stopping else
               f"the {self.name} cancelled or lost it")
        err = CascadeError(f"task {u.key.name!r} ({u.id}) of run {u.run.run_id} did not "
                           f"finish: {why} ({type(exc).__name__}: {exc or '-'})")
        err.__cause__ = exc
        return err

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class _ProcessPool(_Remote):
    """A ``concurrent.futures.ProcessPoolExecutor``: its window is its ``max_workers`` and
    one more; tasks are checked before a run's first body, values in the worker."""
    check = "pickle"
    probes = True

    def slots(self):
        # One more than its workers, as the pool itself queues one call more than it has
        # workers: a worker that ends a body finds the next one at hand. With its workers
        # alone, each waited for the result to reach the engine and the next body to come
        # back (2-4 ms a body on a busy 2-core host: W11 was 1.10-1.17x pool.map, now 1.0x).
        return super().slots() + 1


class _Dask(_Remote):
    """A Dask cluster, through its ``distributed.Client`` (passed as the executor, or
    behind its ``get_executor()``): each body is submitted with a key of its own (so
    identical calls and retries all run: the executor's default, pure=True, gave
    identical calls one key and ran them once), its ``with_constraints`` amounts as
    Dask ``resources=``, and the executor's own options (workers=, retries=, ...).
    Futures are awaited on the client's loop and cancelled without blocking."""
    check = "dask"
    probes = True
    sized = True

    def __init__(self, executor, client, options):
        super().__init__(executor, "Dask cluster")
        self.client = client
        self.options = {k: v for k, v in options.items() if k != "pure"}

    def slots(self):
        # Its threads, and one task more per worker: as Dask's own scheduler sends each
        # worker one task ahead (worker-saturation 1.1), so that a worker has its next
        # task at hand when one ends. With threads alone each worker waited a scheduler
        # round trip for every task (15-25 % of 100 ms tasks on a busy 2-core host).
        return sum(n + 1 for n in self.client.nthreads().values())

    def wires(self, task):
        # A task of the main script that the workers do not find by name (a worker's
        # __main__ is not the script, or has no such name) goes as its function, which
        # Dask sends by value (cloudpickle), as it sends what pickle cannot.
        if not _by_name(task):
            return (task.fn,)
        return (task, task.fn) if task.__module__ == "__main__" else (task,)

    def dumps(self, obj):
        import cloudpickle  # what Dask sends with when pickle cannot (Dask needs it)
        return cloudpickle.dumps(obj)

    def probe(self, blob, label):
        import pickle
        return self._watch(self.client.submit(pickle.loads, blob, key=label, pure=False,
                                              **self.options))

    def submit(self, u, fn, args, kwargs):
        opts = self.options
        if u.key.amounts:  # the local count stays; Dask places it on a worker that has them
            opts = {**opts, "resources": {**(opts.get("resources") or {}),
                                          **dict(u.key.amounts)}}
        fut = self.client.submit(_call_task, fn, args, kwargs, u.key.name, "dask",
                                 key=f"{u.id}-{u.run.run_id}-{u.attempt}", pure=False, **opts)
        return self._watch(fut)

    def _watch(self, fut):
        """A concurrent.futures.Future that gets ``fut``'s outcome: awaited on the client's
        loop (a coroutine per future, so results are fetched concurrently)."""
        out = concurrent.futures.Future()
        out.remote = fut

        async def wait():
            try:
                value = await fut
            except BaseException as exc:  # a lost or cancelled future: CancelledError
                out.set_exception(exc)
            else:
                out.set_result(value)
        self.client.loop.add_callback(wait)
        return out

    def cancel(self, futures):
        remote = [f.remote for f in futures]
        try:
            coro = self.client.cancel(remote, asynchronous=True, reason="cascade-run-stopped",
                                      msg="the Cascade run that submitted it stopped")
        except TypeError:  # distributed before 2024.7 has no reason= nor msg= (regression:
            coro = self.client.cancel(remote, asynchronous=True)  # the run hung in _stop)
        self.client.loop.add_callback(lambda: coro)


def _remote_for(executor):
    """The _Remote for a user's ``executor``, or None for a thread pool (its threads call
    back into this process: bodies pass the start gate in them, right before they run)."""
    if executor is None or isinstance(executor, (_Workers, concurrent.futures.ThreadPoolExecutor)):
        return None
    dist = sys.modules.get("distributed")  # only set if the user has imported Dask
    if dist is not None:
        if isinstance(executor, dist.Client):
            return _Dask(executor, executor, {})
        cfe = sys.modules.get("distributed.cfexecutor")
        if cfe is not None and isinstance(executor, cfe.ClientExecutor):
            return _Dask(executor, executor._client, dict(executor._kwargs))
    if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
        return _ProcessPool(executor, "process pool")
    return _Remote(executor)


def _gen_next(gen):
    # StopIteration cannot cross a Future, so "did not yield" is returned instead.
    for value in gen:
        return value
    return _MISSING


def _gen_finish(gen):
    for _ in gen:
        raise RuntimeError("a resource generator must yield exactly once")


class _Reporter:
    """A run's events (to the engine's bus) and telemetry records (to its link), each
    kind from one method. Per-task events are built only when somebody listens: the
    listening flags are re-read only when the bus's subscriptions changed (hot path).
    ``tele`` and ``life``: where task and lifecycle records go (the run link's methods,
    as the engine's ``telemetry`` option says), or None."""
    __slots__ = ("run", "bus", "tele", "life", "version", "on_start", "on_finish",
                 "_started", "_finished", "_failed", "_starts")

    def __init__(self, run):
        self.run, self.bus, self.tele, self.life = run, run.engine._bus, None, None
        self.version = -1  # never read the bus yet: the first check refreshes
        self.on_start = self.on_finish = self._started = False
        self._finished = self._failed = ()
        self._starts = []  # TaskExecutionStarted events not delivered yet (see started)

    def refresh(self):
        """Re-read who listens; the run calls it when ``version`` is not the bus's. Then
        ``on_start``/``on_finish``: whether a body's start / success is reported at all."""
        bus = self.bus
        self.version = bus.version
        self._started = bool(bus.wants(TaskExecutionStarted))
        self._finished = bus.wants(TaskExecutionFinished)
        self._failed = self._finished + bus.exactly(_TaskFailures)
        self.on_start = self._started or self.tele is not None
        self.on_finish = bool(self._finished) or self.tele is not None

    def use(self, rl):
        """Send telemetry records to the run link ``rl``: everything, a map's items as
        counts, the run's start and end only, or nothing (the engine's ``telemetry``)."""
        mode = self.run.engine.telemetry
        self.life = None if mode == "off" else rl.lifecycle
        self.tele = rl.count if mode == "counts" else rl.task if mode == "all" else None
        self.version = -1  # on_start and on_finish depend on it

    def run_started(self, target_names, params):
        if self.life is not None:
            self.life("ENGINE_STARTED", None)
        self.bus.emit(RunStarted(self.run.run_id, target_names, params))

    def _emit(self, event, callbacks=None):
        """Emit a run event, after the starts not delivered yet (the run's events keep
        their order)."""
        if self._starts:
            self.deliver_starts()
        if callbacks is None:
            self.bus.emit(event)
        else:
            self.bus.deliver(callbacks, event)

    def run_finished(self, status, duration, error):
        if self.life is not None:
            self.life("ENGINE_STOPPED", status)
        self._emit(RunFinished(self.run.run_id, status, duration, error))

    def started(self, u):  # when on_start
        """A body begins. Its TaskExecutionStarted is delivered from the next loop
        callback, or before any later event of the run, whichever comes first: never
        between the start gate and the body (regression: a subscriber taking 2 ms let
        half the starts begin after a pause() from another thread had returned)."""
        if self._started:
            node = u.node
            uid = (node._id or node.id) if u.index is None else u.id
            if not self._starts:
                self.run.loop.call_soon(self.deliver_starts)
            self._starts.append(TaskExecutionStarted(self.run.run_id, uid, node.key.name))
        if self.tele is not None:
            self.tele(u.node, u.index, "RUNNING", None, None)

    def deliver_starts(self):
        starts, self._starts = self._starts, []
        for event in starts:
            self.bus.emit(event)

    def finished(self, u, duration, exc):  # a success when on_finish; every failure
        if self.version != self.bus.version:
            self.refresh()
        cbs = self._finished if exc is None else self._failed
        if cbs:
            node = u.node
            uid = (node._id or node.id) if u.index is None else u.id
            self._emit(TaskExecutionFinished(
                self.run.run_id, uid, node.key.name, "Succeeded" if exc is None else "Failed",
                duration, exc), cbs)
        if self.tele is not None:
            self.tele(u.node, u.index, "COMPLETED" if exc is None else "FAILED", duration * 1000,
                      exc)

    def blocked(self, u):
        u.reported = True  # once per wait
        cp = self.run.cp
        if self.bus.wants(TaskBlocked):
            self._emit(TaskBlocked(self.run.run_id, u.id, u.key.name, cp.reason(u)))
        if self.tele is not None:
            self.tele(u.node, u.index, "BLOCKED", None, cp.reason(u))

    def retrying(self, u, max_attempts, wait, exc):
        self._emit(TaskRetrying(self.run.run_id, u.id, u.key.name, u.attempt,
                                   max_attempts, wait, exc))
        if self.tele is not None:
            self.tele(u.node, u.index, "RETRYING", None, exc)

    def cached(self, u, source):
        if self.bus.wants(TaskCached):
            self._emit(TaskCached(self.run.run_id, u.id, u.node.key.name, source))
        if self.tele is not None:
            self.tele(u.node, u.index, "CACHED", None, None)

    def skipped(self, node, reason):
        self._emit(TaskSkipped(self.run.run_id, node.id, node.lazy.task.name, reason))
        if self.tele is not None:
            self.tele(node, None, "SKIPPED", None, reason)

    def resource(self, name, acquired):
        self._emit((ResourceAcquired if acquired else ResourceReleased)(self.run.run_id, name))


class _Resources:
    """A run's resources: each set up once, on first need (after the resources it
    injects), and torn down in reverse order of set-up when the run ends."""

    def __init__(self, run):
        self.run = run
        self.values = {}        # name -> value, once set up
        self._futures = {}      # name -> future of its value (set-up may be under way)
        self._stack = []        # (resource, generator), in set-up order
        self._setups = set()    # tasks setting up resources before a unit's body
        self.escaped = None     # a KeyboardInterrupt/SystemExit raised by a tear-down
        # same_thread resources (see resource()): where each resource lives, by the name
        # of the same_thread resource whose thread it is (None: the engine's pool), and
        # those threads, each a _Workers of one; ``stuck``: those a body still holds
        # after the run abandoned it (see _Run._abandon).
        self.homes = {}
        self.threads = {}
        self.stuck = set()

    def missing(self, lz):
        return any(r not in self.values for _, r in lz.injects)

    def place(self, special, needed):
        """At run start: find the thread each needed resource lives on (see homes), and
        check that no task or resource needs two same_thread resources, and that no
        async task needs one; else ResourceError, naming them and the fix."""
        registered = self.run.engine._resources
        if not any(registered[r].same_thread for r in needed):
            return
        homes = self.homes

        def home(name, visiting):
            if name in homes:
                return homes[name]
            res = registered[name]
            found = {name} if res.same_thread else set()
            for _, r in res.injects:
                if r not in visiting:
                    found.add(home(r, visiting | {r}))
            found.discard(None)
            if len(found) > 1:
                raise ResourceError(
                    f"resource {name!r} needs same_thread resources {sorted(found)}, which "
                    "live on different threads; make one same_thread resource that yields "
                    "what they do")
            homes[name] = h = next(iter(found), None)
            return h

        for name in needed:
            home(name, {name})
        for node in special:
            lz = node.lazy
            if not lz.injects or lz.task is None:
                continue
            found = sorted({homes[r] for _, r in lz.injects} - {None})
            if len(found) > 1:
                raise ResourceError(
                    f"task {lz.task.name!r} needs same_thread resources {found}, which live "
                    "on different threads; make one same_thread resource that yields what "
                    "they do")
            if found and lz.task.is_async:
                raise ResourceError(
                    f"async task {lz.task.name!r} injects same_thread resource {found[0]!r}, "
                    "which may be used only on its own thread; make the task a plain def "
                    "(its body then runs on that thread)")

    def home_of(self, lz):
        """The name of the same_thread resource on whose thread a sync body that
        injects resources runs, or None: the run's pool (see place)."""
        for _, r in lz.injects:
            h = self.homes.get(r)
            if h is not None:
                return h
        return None

    def _pool_for(self, name):
        h = self.homes.get(name)
        if h is None:
            return self.run.engine._threads()
        pool = self.threads.get(h)
        if pool is None:
            pool = self.threads[h] = _Workers(1, prefix=f"cascade-resource-{h}")
        return pool

    def start_after_setup(self, u):
        t = self.run.loop.create_task(self._setup_then_start(u))
        self._setups.add(t)
        t.add_done_callback(self._setups.discard)

    def cancel_setups(self):
        for t in list(self._setups):
            t.cancel()

    async def _setup_then_start(self, u):
        run = self.run
        try:
            for _, r in u.node.lazy.injects:
                await self.get(r)
        except BaseException as exc:
            run.drop_launched(u)
            if not isinstance(exc, asyncio.CancelledError):
                run._fail(exc, u.id, u.key.name)
            return
        if run.stopping:
            return run.drop_launched(u)
        run._start(u)

    async def get(self, name):
        fut = self._futures.get(name)
        if fut is None:
            run = self.run
            loop = run.loop
            fut = self._futures[name] = loop.create_future()
            res = run.engine._resources[name]
            try:
                kwargs = {p: await self.get(r) for p, r in res.injects}
                gen = res.fn(**kwargs)
                if res.is_async:
                    value = await gen.__anext__()
                else:
                    value = await loop.run_in_executor(self._pool_for(name), _gen_next, gen)
                    if value is _MISSING:
                        raise ResourceError(f"resource {name!r} returned without yielding")
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # retrieved: the waiter that caused the set-up re-raises it
                raise
            self._stack.append((res, gen))
            self.values[name] = value
            fut.set_result(value)
            run.report.resource(name, True)
        return await fut

    async def tear_down(self):
        """Tear every resource down, in reverse order. A tear-down that raises is logged
        and the others still run; the first KeyboardInterrupt or SystemExit is kept in
        ``escaped`` for the run to raise once it has finished."""
        run = self.run
        while self._stack:
            res, gen = self._stack.pop()
            try:
                if res.is_async:
                    try:
                        await gen.__anext__()
                        raise RuntimeError("a resource generator must yield exactly once")
                    except StopAsyncIteration:
                        pass
                elif self.homes.get(res.name) in self.stuck:
                    _log.warning("resource %r is not torn down: its thread still runs a body "
                                 "that run %s abandoned", res.name, run.run_id)
                else:
                    await run.loop.run_in_executor(self._pool_for(res.name), _gen_finish, gen)
            except Exception:
                _log.exception("tear-down of resource %r failed", res.name)
            except BaseException as exc:  # (regression: it skipped the other tear-downs)
                self.escaped = self.escaped or exc
            run.report.resource(res.name, False)
        for pool in self.threads.values():  # (a stuck one ends when its body returns)
            pool.shutdown(wait=False)


class _Run:
    """One run of a graph on one event loop: dataflow scheduling, retries, skips and
    fail-fast. Its resources are a _Resources, its events and telemetry a _Reporter.
    Every method runs on the loop thread except ``launch`` (any thread) and
    ``_sync_body``/``_post`` (worker threads).

    The way of a granted unit to its body: ``launch`` (from whichever thread granted it)
    -> ``_launch`` (on the loop: set up its resources first if needed) -> ``_start``
    (submit the body) -> the body's thread passes the start gate (``_ControlPlane.gate``)
    -> ``_body_started`` -> the body -> ``_body_finished`` (decides, once, whether the
    unit is done, retries or fails the run)."""

    PUMP_CHUNK = 512

    def __init__(self, engine, target, params, run_id, store=None, durable=False):
        self.engine = engine
        self.cp = engine._cp
        self.target = target
        self.params = dict(params or {})
        self.run_id = run_id
        self.since = math.inf       # when its first task could start (set in execute)
        self.stopping = False
        self.prepared = False       # its graph is built (see Engine._prepared)
        self.error = None
        self.failed_id = None       # the id of the task whose failure failed the run
        self.cached = collections.Counter()  # node -> its executions taken from a store
        self.handle = None          # its RunHandle (engine.start), told when it ends
        self.nodes = {}
        self.tallies = {}           # task -> [count per state] (see _Unit)
        self._prio = {}             # node or task -> its priority offset (see _prioritized)
        self._counts = {}           # task name -> its calls numbered so far (node ids)
        self._kept = set()          # nodes of returned graphs that a later one shares
        self.returning = 0          # returned graphs not settled yet (live _Forwards)
        self.keys = {}              # task, or (task, amounts) -> its interned _Key
        self.link = None            # its _RunLink, when the engine has a connector
        self._ready = collections.deque()   # nodes whose inputs are all done, FIFO
        self._pumping = False
        self._pump_soon = False
        self._inflight = 0          # launched units whose body has not finished
        self._idle = None           # set once stopping and nothing is in flight
        # Abandoning bodies (see _abandon). _late: a body's thread either reports it
        # returned in time or finds it abandoned, never both. _settled: set under it.
        # _gone: on the loop, once the bodies still running are abandoned.
        self._late = threading.Lock()
        self._settled = False
        self._gone = False
        self._stopped_at = None
        self._timers = {}           # unit -> the handle of its retry delay
        self._cut = {}              # units engine.cancel cut while granted or running
        self.posted = collections.deque()  # units granted on other threads (see launch)
        self._cut_gate = False      # ... and it holds a count of cp._gates for them
        # cancels of 'key:' scopes: (scope, reason, the keyed nodes then unfinished),
        # whose calls are matched as their key values become known (_key_cut)
        self._key_cuts = []
        self._inbox = collections.deque()
        self._drain_pending = False
        self._stamp = engine._cp.stamp
        self._fuse_into = None      # the asyncio task whose body just succeeded (fusion)
        self._fused = None          # (unit, fn, args, kwargs) to run next in that task
        self._fuse_left = self.PUMP_CHUNK   # fusions left in this loop iteration
        self._fuse_refill = False
        self._unbegun = None        # the last unit holding a grant given a body task, till it begins
        self.resources = _Resources(self)
        self.report = _Reporter(self)
        executor = engine._executor
        pool = self._pool = executor if executor is not None else engine._threads()
        # A thread pool runs _sync_body, which calls back into this process; ours needs
        # no future per body. Any other executor is remote (see _Remote): its sync tasks'
        # keys take the engine's window, and _wire has what is sent for each of them.
        self._remote = engine._remote
        self._window = engine._window
        self._wire = {}
        self._checks = set()        # _graft_when_sendable tasks still checking
        self._threaded = self._remote is None
        self._to_thread = pool.call if isinstance(pool, _Workers) else pool.submit
        # Its store (see _Stored): None unless the run is checkpointed (``durable``: it
        # was given an id) or has calls with_cache (see _prepare), so a run without one
        # pays one check per batch of units (_submit) and one per success.
        self._stored = None if store is None else _Stored(self, store)
        self._durable = durable
        self._skeys = {}            # unit -> [(store key, ttl, source)] written on success
        self._lookups = set()       # lookups under way (async and worker-thread stores)
        self._looking = set()       # ... the units they are for (engine.cancel cuts them)
        self._ahead = {}            # (map node, index) -> (keys, values) read ahead
        self._unhashed = set()      # task names warned about: arguments with no stable hash

    # -- entry point --------------------------------------------------------
    async def execute(self):
        loop = self.loop = asyncio.get_running_loop()
        # Bodies' tasks: asyncio.Task itself unless the loop has a task factory, which is
        # then honoured (loop.create_task costs a Python call more per task).
        self._new_task = (functools.partial(asyncio.Task, loop=loop)
                          if loop.get_task_factory() is None else loop.create_task)
        self.thread = threading.get_ident()
        self._wake = loop.create_future()
        t0 = time.perf_counter()
        self.started_at = time.time()
        error = None
        status = "Failed"
        self.engine._runs[self.run_id] = self
        link = self.engine._link
        if link is not None:
            self.link = link.attach(self)
            self.report.use(self.link)
        targets = self.target.deps if type(self.target) is _Gather else [self.target]
        self.report.run_started(tuple(d.name for d in dict.fromkeys(targets)),
                                dict(self.params))
        try:
            if self.engine._closed:
                raise CascadeError("this engine is closed; make a new cs.Engine() to run")
            self._prepare()
            for scope in self.engine._prepared(self):  # cancels from before its graph
                self.cancel(scope)
            if self.link is not None:
                await self.link.open()
            if self._remote is not None:
                await self._check_remote()
            # The run starts now, after its sync with the broker: a drain put in force
            # after this holds it, one in force before (retained on the broker) too.
            self.since = time.monotonic()
            self._pump()
            try:
                await self._wake
            except asyncio.CancelledError:
                self._stop()
                raise
            if self.error is not None:
                raise self.error
            result = self._result()
            status = "Succeeded"
            return result
        except asyncio.CancelledError:
            status = "Cancelled"
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            # Clean-up runs to its end whatever happens meanwhile: a cancel() here is
            # taken once it is done (regression: a second cancel during tear-down left
            # resources up, no RunFinished, and the run listed as active).
            self._stop()
            cancelled = await self._wait_for_bodies()
            if self._cut_gate:  # cut units the run never heard of again (abandoned)
                self._cut.clear()
                self._cut_end(None)
            cancelled |= await _to_the_end(self.resources.tear_down())
            store_error = None
            if self._stored is not None:  # its writes are done before the run ends
                for t in self._lookups:
                    t.cancel()
                closing = asyncio.ensure_future(self._stored.close())
                cancelled |= await _to_the_end(closing)
                if closing.done() and not closing.cancelled():
                    store_error = closing.result()
                if store_error is not None and (status != "Failed" or error is store_error):
                    # raised below if the run had succeeded (found only at the end, it
                    # is self.error too, but nothing raises it); else what is raised
                    # already (this error, an earlier one, a cancel) goes on
                    succeeded = status == "Succeeded"
                    status, error = "Failed", store_error
                    if not succeeded:
                        store_error = None
                else:
                    store_error = None
            escaped = self.resources.escaped
            if escaped is not None:
                status, error = "Failed", escaped
            self.engine._runs.pop(self.run_id, None)
            self.engine._early.pop(self.run_id, None)
            if self.handle is not None:  # its drawing keeps the states, not the run
                self.handle._ended(self)
            if self.engine._closed and not self.engine._runs:
                self.engine._let_go()  # close() left it to the last run
            if cancelled and status != "Failed":
                status = "Cancelled"
            duration = time.perf_counter() - t0
            cancelled |= await _to_the_end(self.engine._history.add(
                self, status, duration, error))
            self.report.run_finished(status, duration, error)
            if self.link is not None:
                cancelled |= await _to_the_end(self.link.close())
            if escaped is not None:
                raise escaped
            if store_error is not None:
                raise store_error  # (a strict store that failed at the end)
            if cancelled:
                raise asyncio.CancelledError()

    def _specials(self, special):
        """The nodes of a graph just built that are not plain calls (see _build_nodes):
        params and env get their values, static capacity amounts are checked. Returns
        (the params missing, the params the graph has, the resources it injects)."""
        missing, known, needed = [], set(), set()
        caps = self.cp._caps
        for node in special:  # the plain calls need no check
            lz = node.lazy
            t = type(lz)
            if t is Param:
                known.add(lz.param)
                if lz.param in self.params:
                    node.value = self.params[lz.param]
                elif lz.default is not _MISSING:
                    node.value = lz.default
                else:
                    missing.append(lz.param)
            elif t is Env:
                node.value = os.environ.get(lz.var, lz.default)
            else:
                needed.update(r for _, r in lz.injects)
                for k, v in (lz.amounts or {}).items():
                    if not isinstance(v, LazyResult):
                        _check_amount(caps, lz, k, v)
        return missing, known, needed

    def _prepare(self):
        self.nodes, roots, special = _build_graph(self.target, self.tallies, self._counts)
        cached = [n for n in special if n.lazy.policy is not None
                  and n.lazy.policy.cache is not None]
        if cached and self._stored is None:
            raise CascadeError(f"{cached[0].id} is with_cache() but the run has no store; "
                               "pass one: cs.Engine(store=cs.SqliteStore('cache.db')) or "
                               "cs.run(..., store=...)")
        if not cached and not self._durable:
            self._stored = None  # nothing to look up or write: free
        missing, known, needed = self._specials(special)
        self._note_priorities(special)
        for node in roots:
            node.seq = self._stamp() if not self._prio else self._prioritized(node)
        self._ready.extend(roots)
        if missing:
            names = ", ".join(repr(m) for m in sorted(set(missing)))
            raise ParamError(f"missing required params: {names}; pass them with "
                             f"run(target, params={{{', '.join(f'{m!r}: ...' for m in sorted(set(missing)))}}})")
        unknown = set(self.params) - known
        if unknown:
            raise ParamError(f"unknown params {sorted(unknown)}: the graph has "
                             f"{sorted(known) or 'no params'}")
        self._place(special, needed)

    def _place(self, special, needed):
        """Check that the resources ``needed`` by the nodes ``special`` (and those they
        inject) are registered, and find where each lives (see _Resources.place): at
        run start, and for each graph a task returns."""
        registered = self.engine._resources
        stack, seen = list(needed), set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name not in registered:
                raise ResourceError(f"resource {name!r} is injected but not registered; "
                                    "pass it with engine.register(r) or "
                                    "cs.run(..., resources=[r])")
            stack.extend(r for _, r in registered[name].injects)
        self.resources.place(special, seen)

    async def _check_remote(self, tasks=None):
        """Before any body on a remote executor: size the window afresh (a Dask cluster's
        threads, unless ``Engine(window=)`` fixed it), and choose what is sent for each
        distinct sync task of the graph (see _Remote.wires): the first way that pickles
        here and that a worker loads inside a call (process pools, Dask), which leaves
        the executor as it was. Raises CascadeError naming each task that cannot be
        sent, and the fix. (Regression: a lambda task broke the user's process pool for
        good; on Dask a task defined under `if __name__ == "__main__":` killed the
        workers that loaded it, and the run never ended.) With ``tasks``: only those
        (the new sync tasks of a graph a task returned, see _returned_graph)."""
        remote = self._remote
        first = tasks is None
        if first:
            tasks = [t for t in self.tallies if not t.is_async]
        if not tasks:
            return
        waits = []
        if first and remote.sized and self.engine._window_size is None:
            sizing = self.loop.run_in_executor(self.engine._threads(), remote.slots)
            sizing.add_done_callback(_retrieved)
            waits.append(sizing)
        else:
            sizing = None
        ways = {t: list(remote.wires(t)) for t in tasks}
        if not remote.probes:
            self._wire.update((t, w[0]) for t, w in ways.items())
            ways = {}
        tried = {t: [] for t in ways}  # the errors of each way tried, in order
        problems = []
        while ways or waits:
            probes = []
            for t, left in list(ways.items()):
                if not left:
                    del ways[t]
                    problems.append(_cannot_send(remote, t, tried[t]))
                    continue
                wire = left.pop(0)
                try:
                    blob = remote.dumps((_call_task, wire))
                except Exception as exc:
                    tried[t].append((exc, False))
                    continue
                f = remote.probe(blob, f"cascade-check-{t.name}-{self.run_id}-{len(tried[t])}")
                probes.append((t, wire, f))
                w = asyncio.wrap_future(f)
                w.add_done_callback(_retrieved)  # (read below from f itself)
                waits.append(w)
            try:
                if waits:
                    await asyncio.wait(waits)
            except asyncio.CancelledError:  # the run is cancelled meanwhile
                remote.cancel([f for _, _, f in probes if not f.done()])
                raise
            waits = []
            for t, wire, f in probes:
                exc = concurrent.futures.CancelledError() if f.cancelled() else f.exception()
                if exc is None:
                    self._wire[t] = wire
                    del ways[t]
                elif isinstance(exc, (concurrent.futures.CancelledError, asyncio.CancelledError,
                                      concurrent.futures.BrokenExecutor)):
                    raise CascadeError(f"the {remote.name} failed while run {self.run_id} "
                                       f"checked its tasks, before any body: "
                                       f"{type(exc).__name__}: {exc or '-'}") from exc
                else:
                    tried[t].append((exc, True))
        if sizing is not None:
            self.cp.resize(self._window, max(1, sizing.result()))
        if problems:
            raise CascadeError(problems[0] if len(problems) == 1 else
                               f"{len(problems)} tasks cannot be sent: " + "; ".join(problems))

    # -- dataflow -----------------------------------------------------------
    def _pump(self):
        """Process ready nodes in FIFO order, ``PUMP_CHUNK`` units at a time: between
        chunks the loop runs, so a fan-out or a map of 100,000 neither blocks the loop
        (controls and other tasks get their turn) nor keeps 100,000 asyncio tasks (or
        waiting units) alive at once. A map that is not fully expanded stays first."""
        if self._pumping or self._pump_soon:  # a chunk per loop iteration, not per call
            return
        self._pumping = True
        try:
            ready = self._ready
            budget = self.PUMP_CHUNK
            while ready and not self.stopping and budget > 0:
                node = ready.popleft()
                if node.items is not None:
                    budget -= self._expand(node, budget)
                else:
                    budget -= self._process(node, budget)
        finally:
            self._pumping = False
        if ready and not self.stopping and not self._pump_soon:
            self._pump_soon = True
            self.loop.call_soon(self._pump_later)

    def _take_next(self):
        """The next ready node, processed now by a finishing body's task (see
        _async_body) instead of by the next pump chunk: the same FIFO order."""
        if not self.stopping:
            node = self._ready.popleft()
            if node.items is not None:
                self._expand(node, 1)
            else:
                self._process(node, 1)

    def _pump_later(self):
        self._pump_soon = False
        self._pump()

    def _process(self, node, budget):
        """A ready node: skip it, complete it (params, gathers), or make its units.
        Returns how much of the pump's budget it used."""
        lz = node.lazy
        t = type(lz)
        if t is not LazyResult or node.skip is not None or lz.condition is not _MISSING:
            # everything but the common case (a plain call, ready to be admitted)
            if lz is None:  # not a node: an _Item of a pipelined map, or a _Forward
                return node.ready(self)
            if node.skip is not None:
                self._skip(node, node.skip)
                return 1
            cond = lz.condition
            if cond is not _MISSING:
                value = self.nodes[cond].value if isinstance(cond, LazyResult) else cond
                if not value:
                    what = self.nodes[cond].id if isinstance(cond, LazyResult) else repr(cond)
                    self._skip(node, f"run_if condition {what} is falsy")
                    return 1
            if t is _Gather:
                self._complete(node, _resolve(lz.args[0], self.nodes))
                return 1
            if t is Param or t is Env:
                self._complete(node, node.value)
                return 1
        try:
            key = None if lz.amounts else self.keys.get(lz.task)
            node.key = key or self._key(lz)
            if t is MappedLazyResult:
                return self._expand_map(node, budget)
            args, kwargs = lz.args, lz.kwargs
            if lz.lazy_args:
                nodes = self.nodes
                args = tuple([_resolve(a, nodes) for a in args])
                if kwargs:
                    kwargs = {k: _resolve(v, nodes) for k, v in kwargs.items()}
            units = (_Unit(self, node, None, args, kwargs),)
        except (TypeError, ValueError) as exc:
            self._fail(exc, node.id, lz.name)
            return 1
        self._submit(units)
        return 1

    def _key(self, lz):
        """The interned admission key of a call: one per task, or one per task and
        capacity amounts (amounts of 0 take nothing and are left out)."""
        task = lz.task
        window = None if task.is_async else self._window
        cost = task.cost
        costed = callable(cost)
        cost = 1 if costed else cost
        per_unit = costed or bool(task.keys)  # (then each unit gets a key: _unit_key)
        if not lz.amounts:
            key = self.keys[task] = _Key(task.name, task.tags, self.run_id, (), window,
                                         self.since, cost, per_unit)
            return key
        amounts = tuple(sorted(
            (k, n) for k, v in lz.amounts.items()
            for n in [_check_amount(self.cp._caps, lz, k, _resolve(v, self.nodes))] if n))
        key = self.keys.get((task, amounts))
        if key is None:
            key = self.keys[(task, amounts)] = _Key(task.name, task.tags, self.run_id, amounts,
                                                    window, self.since, cost, per_unit)
        return key

    def _expand_map(self, node, budget):
        """Resolve a map's columns once, then make its units a chunk at a time."""
        if node.pipe is not None:
            return self._open_pipe(node, budget)
        lz, nodes = node.lazy, self.nodes
        call = f"{lz.task.name}.map()"
        lengths = {}

        def column(label, pair):
            mapped, v = pair
            v = _resolve(v, nodes)
            if mapped:
                if type(v) is not list:
                    v = _map_items(call, label, v)
                lengths[label] = len(v)
            return mapped, v
        pos = [column(f"#{i}", p) for i, p in enumerate(lz.args)]
        kw = {k: column(repr(k), p) for k, p in lz.kwargs.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{call}: mapped arguments have unequal lengths {lengths}")
        n = next(iter(lengths.values()), 0)
        node.value = [None] * n
        node.left = n
        t = node.tally
        if not n:
            t[_PENDING] -= 1
            t[_DONE] += 1
            self._complete(node, [])
            return 1
        t[_PENDING] += n - 1  # the node is now n pending items
        node.items = (pos, kw)
        node.cursor = 0
        return self._expand(node, budget)

    def _expand(self, node, budget):
        """Make and submit the next ``budget`` units of a map; returns how many."""
        if node.pipe is not None:
            return self._expand_held(node, budget)
        if node.skip is not None:  # skipped meanwhile (see _map_skipped)
            node.items = None
            return 0
        pos, kw = node.items
        i = node.cursor
        end = min(len(node.value), i + budget)
        if not kw and len(pos) == 1 and pos[0][0]:
            items = pos[0][1]
            units = [_Unit(self, node, j, (items[j],), _NO_KWARGS) for j in range(i, end)]
        else:
            units = [_Unit(self, node, j, tuple([v[j] if m else v for m, v in pos]),
                           {k: (v[j] if m else v) for k, (m, v) in kw.items()})
                     for j in range(i, end)]
        node.cursor = end
        if end == len(node.value):
            node.items = None  # fully expanded: the columns can go
        else:
            self._ready.appendleft(node)  # the rest next, before anything readied later
        self._submit(units)
        return end - i

    # -- graphs returned by tasks (see _Forward) -----------------------------
    def _returned_graph(self, u, lazy, t0):
        """``u``'s body returned ``lazy``: the unit is done as any other (its slot goes
        back: a recursion under a limit cannot deadlock on its own slots), and the graph
        of ``lazy`` is added to the run; its root's value becomes the unit's. A graph
        that cannot be added (a cycle, a missing param) fails the task."""
        # On a remote executor, sync tasks that no body of the run has been sent for
        # yet are checked first, as at the run's start (regression: KeyError on the
        # first body of such a task).
        unsent = self._unsent(lazy) if self._remote is not None and not self.stopping else ()
        try:
            fwd = self._graft(u, lazy) if not self.stopping and not unsent else None
            exc = None
        except (TypeError, ValueError, CascadeError) as e:
            fwd, exc = None, e
            if not self.stopping:
                self._fail(exc, u.id, u.key.name)
        self.cp.release(u)
        self._inflight -= 1
        u.body = None
        u.end(_DONE if exc is None else _FAILED)
        rep = self.report
        if exc is not None or rep.on_finish or rep.version != rep.bus.version:
            rep.finished(u, time.perf_counter() - t0, exc)
        if self.stopping:
            return self._check_idle()
        if unsent:
            check = self.loop.create_task(self._graft_when_sendable(u, lazy, unsent))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)
            return
        if fwd is not None and not fwd.pending:
            fwd.seq = self._stamp()
            self._ready.append(fwd)
        self._pump()

    def _unsent(self, lazy):
        """The sync tasks of the graph of ``lazy`` (of its lazy results that are not
        nodes of the run yet) that the run has not chosen what to send for (_wire)."""
        nodes, wire = self.nodes, self._wire
        found, seen, stack = set(), set(), [lazy]
        while stack:
            lz = stack.pop()
            if lz in seen or lz in nodes:
                continue
            seen.add(lz)
            task = lz.task
            if task is not None and not task.is_async and task not in wire:
                found.add(task)
            stack.extend(lz.deps)
        return list(found)

    async def _graft_when_sendable(self, u, lazy, tasks):
        """_returned_graph's graft, once ``tasks`` are checked (see _check_remote); a
        task that cannot be sent fails the task that returned the graph. The node of
        ``u`` stays unsettled meanwhile, so the run waits for this."""
        try:
            await self._check_remote(tasks)
            if self.stopping:
                return
            fwd = self._graft(u, lazy)
        except (TypeError, ValueError, CascadeError) as e:
            if not self.stopping:
                self._fail(e, u.id, u.key.name)
            return
        if not fwd.pending:
            fwd.seq = self._stamp()
            self._ready.append(fwd)
        self._pump()

    def _graft(self, u, lazy):
        """Add the graph of ``lazy`` to the run for unit ``u``; returns its _Forward."""
        node = u.node
        deps = node.dependents
        if (u.index is None and len(deps) == 1 and type(deps[0]) is _Forward
                and deps[0].root is node):
            # ``node`` is itself a returned graph's root (tail call): its _Forward moves
            # on to the new root, and its own graph, all settled now, can go.
            fwd = deps[0]
            node.dependents = ()
            self._drop(fwd)
        else:
            fwd = _Forward(node, u.index)
        waiting = {node.lazy, fwd.node.lazy}  # a graph that needs these never settles
        if lazy in waiting:
            raise ValueError(f"task {u.key.name!r} ({u.id}) returned a lazy result that is "
                             "itself (or the call waiting for it): it would wait forever")
        reached = set()
        fresh, roots, special = _build_nodes(lazy, self.tallies, self._counts, self.nodes,
                                             reached)
        later = None  # the nodes that settle only after fwd.node does (found when needed)
        for lz in reached:
            d = self.nodes[lz]
            if d.pending >= 0 and (any(_depends_on(lz, w) for w in waiting) or id(d) in (
                    later if later is not None else (later := _downstream(fwd.node)))):
                raise ValueError(f"task {u.key.name!r} ({u.id}) returned a graph that needs "
                                 f"{d.id}, which waits for that task: it would wait forever")
            self._kept.add(lz)
        missing, _, needed = self._specials(special)
        if missing:
            raise ParamError(f"task {u.key.name!r} ({u.id}) returned a graph that needs "
                             f"param {missing[0]!r}, which the run was not given; pass it "
                             "with run(target, params={...})")
        if needed:  # (regression: a same_thread resource it alone needed was not placed)
            self._place(special, needed)
        self.nodes.update(fresh)
        root = fwd.root = self.nodes[lazy]
        fwd.fresh = list(fresh)
        if root.pending < 0:  # a node of the run that has settled: its value, now
            fwd.pending, fwd.skip = 0, root.skip and _needs(root, root.skip)
        else:
            fwd.pending = 1
            if root.dependents:
                root.dependents.append(fwd)
            else:
                root.dependents = [fwd]
        self._note_priorities(special)
        for n in roots:
            n.seq = self._stamp() if not self._prio else self._prioritized(n)
        self._ready.extend(roots)
        if fwd.node is node:  # a new one (not one handed on by a tail call)
            self.returning += 1
        return fwd

    def _drop(self, fwd):
        """The graph of ``fwd`` is done: its nodes leave the run (unless a later returned
        graph shares them), so a long recursion keeps no node per level."""
        nodes, kept = self.nodes, self._kept
        for lz in fwd.fresh or ():
            if lz not in kept:
                del nodes[lz]
        fwd.fresh = None

    def _forward_ready(self, fwd):
        """The root of a returned graph has settled: so does the unit that returned it
        (the value of a plain call, or item ``index`` of a map)."""
        root, node, j = fwd.root, fwd.node, fwd.index
        self.returning -= 1
        self._drop(fwd)
        fwd.root = None
        if fwd.skip is not None:
            why = fwd.skip  # ("needs <root>, which was skipped: ...")
            if j is not None:
                self._map_skipped(node, why)
            elif node.skip is None:
                node.skip = why  # (its unit was counted done: its body ran)
                self._settle_node(node, why)
        else:
            self._settle_value(node, j, root.value)
        return 1

    # -- pipelined maps (see _plan_pipe) -------------------------------------
    def _open_pipe(self, node, budget):
        """A pipelined map's whole inputs are done (and its run_if held): it opens. Its
        items ready so far are made now, in input order, a chunk at a time."""
        pipe, nodes = node.pipe, self.nodes
        pos, kw = pipe.cols
        pipe.cols = ([(k, _resolve(v, nodes) if k == 0 else v) for k, v in pos],
                     {name: (k, _resolve(v, nodes) if k == 0 else v) for name, (k, v) in kw.items()})
        node.value = [None] * pipe.n
        node.left = pipe.n
        node.tally[_PENDING] += pipe.n - 1  # the node is now n pending items
        pipe.open = True
        if not pipe.held:
            return 1
        pipe.held.sort()
        node.items, node.cursor = pipe.held, 0
        return self._expand_held(node, budget)

    def _expand_held(self, node, budget):
        """The next ``budget`` items of an opened pipelined map that were ready before
        it opened (``node.items``: their indexes); their readiness is the map's (seq +
        index, as a plain map's items)."""
        held, i = node.items, node.cursor
        if node.skip is not None:  # skipped meanwhile: the rest never run
            node.items = None
            return 0
        end = min(len(held), i + budget)
        units = [self._item_unit(node, j) for j in held[i:end]]
        node.cursor = end
        if end == len(held):
            node.items = node.pipe.held = None
        else:
            self._ready.appendleft(node)  # the rest next, before anything readied later
        self._submit(units)
        return end - i

    def _item_unit(self, node, j):
        pipe, nodes = node.pipe, self.nodes
        pos, kw = pipe.cols
        if not kw and len(pos) == 1 and pos[0][0] == 2:  # a map over a map
            args = (pos[0][1].value[j],)
        else:
            args = tuple([v if k == 0 else _resolve(v[j], nodes) if k == 1 else v.value[j]
                          for k, v in pos])
        kwargs = {name: v if k == 0 else _resolve(v[j], nodes) if k == 1 else v.value[j]
                  for name, (k, v) in kw.items()} if kw else _NO_KWARGS
        pipe.made += 1
        return _Unit(self, node, j, args, kwargs)

    def _item_ready(self, item):
        """A lazy result inside an item of a pipelined map has settled (see _Item)."""
        self._item_input(item.node, item.index, item.skip)
        return 1

    def _item_input(self, node, j, skip=None):
        """One input of item ``j`` of pipelined map ``node`` is done (or skipped): once
        all are, its unit is made (the map is open) or kept for when the map opens."""
        if node.skip is not None:
            return
        if skip is not None:
            return self._map_skipped(node, skip)
        pipe = node.pipe
        waits = pipe.waits
        waits[j] -= 1
        if waits[j]:
            return
        if not pipe.open:
            pipe.held.append(j)
            return
        u = self._item_unit(node, j)
        # ready now: behind whatever became ready before (less its priority)
        u.seq = self._stamp() if not self._prio else self._prioritized(node)
        self._submit((u,))

    def _map_skipped(self, node, reason):
        """A skip reached an item of map ``node`` (an input of a pipelined map's item,
        or the graph an item returned): the whole map is skipped, as when a whole input
        of it is; its items not made yet never run, those made run to their end."""
        if node.skip is not None:
            return
        node.skip = reason
        pipe = node.pipe
        if pipe is None:  # a plain map, one of whose items returned a skipped graph
            n = len(node.value) - node.cursor if node.items is not None else 0
        elif not pipe.open:  # skipped as a whole when it is processed (_process)
            return
        else:
            n = pipe.n - pipe.made  # >= 1: this item was not made
        t = node.tally
        t[_PENDING] -= n
        t[_SKIPPED] += n
        self.report.skipped(node, reason)
        if node.out is not None:
            self._skip_out(node, _needs(node, reason))
        self._settle_node(node, _needs(node, reason))

    def _item_out(self, node, j):
        """Item ``j`` of map ``node`` is done: an input of item ``j`` of each pipelined
        map over it."""
        for m in node.out:
            self._item_input(m, j)

    def _skip_out(self, node, why):
        """Map ``node`` is skipped: so is each pipelined map over it."""
        for m in node.out:
            self._map_skipped(m, why)

    def _submit(self, units, key=None):
        """Units (of one node, in order) wait for admission, or start at once. ``key``:
        the admission key they share, when it is not their node's (weighted starts).
        Fresh units of a run with a store are looked up in it first (_look_up)."""
        if key is None:
            if self._stored is not None and units[0].state == _PENDING:
                return self._look_up(units)
            key = units[0].node.key
            if key.cost != 1 or key.per_unit:  # weighted or keyed (not the common case)
                return self._submit_weighted(units)
        if self.cp.enqueue(units, key):
            if self.posted:  # (granted earlier on another thread: they go first)
                self.launch_posted()
            for u in units:
                self._launch(u)
            return
        for u in units:
            if u.state == _WAITING and not u.reported:
                self.report.blocked(u)

    def _submit_weighted(self, units):
        """``_submit`` for a task with a cost or keys (see ``task``): a cost that is a
        function, and key values, are worked out for each unit once (a retry keeps
        them), and each unit waits with the key of its cost and key values (FIFO across
        them holds: admission looks at the oldest head first), all under one lock. A
        cost above a matching rate limit's burst fails the run at once."""
        groups = {}  # key -> its units, in order (so FIFO order holds)
        made = {}    # (cost, key values...) -> the key made for them in this batch
        for u in units:
            key = u.key
            if key.per_unit:  # a fresh unit (nothing else holds it yet): one with its own key
                try:
                    key = self._unit_key(u, made)
                except Exception as exc:
                    return self._fail(exc, u.id, u.node.lazy.name)
                if self._key_cuts and self._key_cut(u, key):
                    continue
                w = _Weighted.of(u, key)
                if self._skeys:  # its store keys (see _look_up) go with it
                    ks = self._skeys.pop(u, None)
                    if ks is not None:
                        self._skeys[w] = ks
                u = w
            group = groups.get(key)
            if group is None:
                groups[key] = [u]
                if key.cost > 1:
                    why = self.cp.over_burst(key)
                    if why is not None:
                        return self._fail(ConstraintError(why), u.id, key.name)
            else:
                group.append(u)
        if len(groups) <= 1:
            if groups:
                key, group = groups.popitem()
                self._submit(group, key)
            return
        if self.cp.enqueue_many(list(groups.items())):
            if self.posted:  # (granted earlier on another thread: they go first)
                self.launch_posted()
            for group in groups.values():
                for u in group:
                    self._launch(u)
            return
        for group in groups.values():
            for u in group:
                if u.state == _WAITING and not u.reported:
                    self.report.blocked(u)

    # -- stores: checkpoints and with_cache (see _Stored) ---------------------
    def _submit_found(self, units):
        """``_submit`` for fresh units once looked up (their misses)."""
        key = units[0].node.key
        if key.cost != 1 or key.per_unit:
            return self._submit_weighted(units)
        return self._submit(units, key)

    def _store_keys(self, node, index, args, kwargs):
        """The store keys of item ``index`` of ``node`` (None: the call), called with
        ``args`` and ``kwargs``: ``[(key, ttl, source)]``, most specific first:
        its with_cache key (task name, version, argument hash or the user's key), and in
        a checkpointed run its checkpoint key (run id, its id in the graph -- ``name-k``,
        the k-th call of its task in creation order, with ``[index]`` for a map's item --
        and the argument hash, so that a changed graph never reads another's value)."""
        lz = node.lazy
        policy = lz.policy
        cache = None if policy is None else policy.cache
        uid = node.id if index is None else f"{node.id}[{index}]"
        out = []
        h = None
        if cache is not None:
            k = cache.key
            if k is None:
                try:
                    k = h = _args_hash(args, kwargs, lz.task._where)
                except TypeError as exc:
                    raise TypeError(f"with_cache() of {uid}: {exc}; pass key=, a function of "
                                    "the arguments that returns a str for them") from None
            elif callable(k):
                k = k(*args, **kwargs)
                if not isinstance(k, str):
                    raise TypeError(f"with_cache(key=...) of {uid} returned {k!r:.80}; it "
                                    "must return a str")
            out.append((f"cache:{lz.task.name}:{cache.version}:{k}", cache.ttl, "cache"))
        if self._durable:
            if h is None:
                try:
                    h = _args_hash(args, kwargs, lz.task._where)
                except TypeError as exc:
                    name = lz.task.name
                    if name not in self._unhashed:
                        self._unhashed.add(name)
                        _log.warning("run %s: %s is not checkpointed: %s (it runs again on a "
                                     "re-run)", self.run_id, uid, exc)
                    return out
            out.append((f"run:{self.run_id}:{uid}:{h}", None, "checkpoint"))
        return out

    def _look_up(self, units):
        """Fresh units of a run with a store: those whose value the store holds are done
        at once (``TaskCached``); the others go on to admission. An inline store answers
        now; any other from a task of the loop (the units wait meanwhile)."""
        st = self._stored
        want, keys, known = [], [], []
        if not st.off:
            ahead = self._ahead
            for u in units:
                if ahead:
                    got = ahead.pop((u.node, u.index), None)
                    if got is not None:  # its keys and values were read ahead (_read_ahead)
                        known.append((u, *got))
                        continue
                try:
                    ks = self._store_keys(u.node, u.index, u.args, u.kwargs)
                except Exception as exc:
                    return self._fail(exc, u.id, u.node.lazy.name)
                if ks:
                    want.append((u, ks))
                    keys.extend([k for k, _, _ in ks])
        if not want and not known:
            return self._submit_found(units)
        if st.inline:
            extra = self._read_ahead(units[-1].node) if keys and len(units) < 32 else ()
            if extra:
                keys.extend([k for _, ks in extra for k, _, _ in ks])
            values = st.get_now(keys) if keys else []
            if values is None:  # the store failed (and is off)
                return self._looked(units, want, None)
            if extra:
                i = len(values) - sum(len(ks) for _, ks in extra)
                for ident, ks in extra:
                    self._ahead[ident] = (ks, values[i:i + len(ks)])
                    i += len(ks)
                del values[len(values) - sum(len(ks) for _, ks in extra):]
            for u, ks, got in known:
                want.append((u, ks))
                values.extend(got)
            return self._looked(units, want, values)
        self._looking.update(units)
        t = self.loop.create_task(self._look_up_later(units, want, keys))
        self._lookups.add(t)
        t.add_done_callback(self._lookups.discard)

    def _read_ahead(self, node):
        """With an inline store, the next items of map ``node`` (not made yet) and their
        keys, ``[((node, index), keys)]``, read in the same query as the items looked up
        now: async bodies that finish make a map's next items one or two at a time (see
        _take_next), and a query for each would cost more than the rest of the task."""
        if type(node.lazy) is not MappedLazyResult or node.items is None or \
                node.pipe is not None or node.skip is not None:
            return ()
        pos, kw = node.items
        simple = not kw and len(pos) == 1 and pos[0][0]
        out = []
        for j in range(node.cursor, min(len(node.value), node.cursor + 256)):
            if (node, j) in self._ahead:
                continue
            if simple:
                args, kwargs = (pos[0][1][j],), _NO_KWARGS
            else:
                args = tuple([v[j] if m else v for m, v in pos])
                kwargs = {k: (v[j] if m else v) for k, (m, v) in kw.items()}
            try:
                ks = self._store_keys(node, j, args, kwargs)
            except Exception:  # (it fails when its unit is made)
                break
            if ks:
                out.append(((node, j), ks))
        return out

    async def _look_up_later(self, units, want, keys):
        values = await self._stored.get(keys)
        self._looking.difference_update(units)
        if self.stopping:
            return
        cut = [u for u in units if u.node.skip is not None]
        if cut:  # cancelled meanwhile (see cancel): they never run
            for u in cut:
                t = u.node.tally
                t[_PENDING] -= 1
                t[_SKIPPED] += 1
                u.state = _SKIPPED
            units = [u for u in units if u.node.skip is None]
            if values is not None:
                i, kept = 0, []
                for u, ks in want:
                    if u.node.skip is None:
                        kept.extend(values[i:i + len(ks)])
                    i += len(ks)
                values = kept
            want = [(u, ks) for u, ks in want if u.node.skip is None]
            if not units:
                return
        self._looked(units, want, values)

    def _looked(self, units, want, values):
        """The store's ``values`` for the keys of ``want`` (None: the store failed)."""
        if self.stopping:
            return
        hits = {}
        if values is not None:
            i = 0
            for u, ks in want:
                for (_, _, source), v in zip(ks, values[i:i + len(ks)]):
                    if v is not MISS:
                        hits[u] = (v, source)
                        break
                else:
                    self._skeys[u] = ks
                i += len(ks)
        misses = [u for u in units if u not in hits] if hits else units
        if misses:
            self._submit_found(misses)
        for u, (value, source) in hits.items():
            if self.stopping:
                return
            t = u.node.tally
            t[_PENDING] -= 1
            t[_CACHED] += 1
            u.state = _CACHED
            self.cached[u.node] += 1
            self.report.cached(u, source)
            self._settle_value(u.node, u.index, value)

    def _record(self, u, value):
        """``u`` succeeded: its value goes to the store under its keys."""
        ks = self._skeys.pop(u, None)
        if ks is not None:
            for k, ttl, _ in ks:
                self._stored.put(k, value, ttl)

    def _unit_key(self, u, made):
        """The admission key of unit ``u`` of a task whose cost is a function of its
        arguments, or that has keys: its node's key, with the cost and key values of this
        call. Shared by the units of one batch (``made``); units of another batch with
        the same values get a key of their own (FIFO holds across keys), so a key lives
        only as long as its units: 100,000 customers over a run leave none behind."""
        base = u.node.key
        task = u.node.lazy.task
        cost = base.cost
        if callable(task.cost):
            cost = task.cost(*u.args, **u.kwargs)
            if isinstance(cost, bool) or not isinstance(cost, int) or not 0 <= cost <= _MAX_COUNT:
                raise ConstraintError(f"the cost function of task {task.name!r} returned "
                                      f"{cost!r:.80} for {u.id}; it must return an int from 0 "
                                      f"to {_MAX_COUNT}")
        ka = task._key_arg
        if ka is not None:  # (the common case: one key, an argument)
            kname, name, i, d = ka
            args, kwargs = u.args, u.kwargs
            v = _arg_of(args, kwargs, name, i, d)
            v = v if type(v) is str else str(v)
            values = {kname: v} if len(v) <= 200 else _key_values(task, args, kwargs)
            ident = (cost, v)
        else:
            values = _key_values(task, u.args, u.kwargs) if task.keys else None
            ident = (cost, *values.values()) if values else cost
        key = made.get(ident)
        if key is None:
            key = made[ident] = _Key(base.name, base.tags, self.run_id, base.amounts,
                                     base.window, base.since, cost, False, values, base)
        return key

    def _complete(self, node, value):
        node.value = value
        self._settle_node(node, None)

    def _skip(self, node, reason):
        node.skip = reason
        if node.lazy.task is not None:
            t = node.tally
            t[_PENDING] -= 1
            t[_SKIPPED] += 1
            self.report.skipped(node, reason)
        if node.out is not None:
            self._skip_out(node, _needs(node, reason))
        self._settle_node(node, _needs(node, reason))

    def _settle_node(self, node, skip):
        """``node`` is done (``skip`` None) or skipped (``skip``: the reason its
        dependents carry): the dependents that now have all their inputs are ready."""
        node.pending = -1  # settled (see _Node)
        woke = False
        for d in node.dependents:
            if skip is not None and d.skip is None:
                d.skip = skip
            d.pending -= 1
            if not d.pending:
                # ready now, even if processed a chunk later (less its priority)
                d.seq = self._stamp() if not self._prio else self._prioritized(d)
                self._ready.append(d)
                woke = True
        if node.lazy is self.target and not self._wake.done():
            self._wake.set_result(None)
        if woke:
            self._pump()

    def _result(self):
        node = self.nodes[self.target]
        if node.skip is not None:
            raise DependencyMissingError(f"the run target {node.id!r} was skipped, so it has "
                                         f"no value: {node.skip}")
        return node.value

    # -- from grant to body -------------------------------------------------
    def launch(self, units):
        """Granted ``units``, from whichever thread granted them. They wait in ``posted``
        with every other unit of the run granted and not launched yet, in grant order
        (put there under the control plane's lock: _ControlPlane._post), and are
        launched from there, on the loop, in that order (regression: a unit granted by
        a refill on the clock thread began after one granted just after it on the loop,
        and, the other way round, before ones the loop had granted just before it)."""
        if threading.get_ident() == self.thread:
            return self.launch_posted()
        try:
            self.loop.call_soon_threadsafe(self.launch_posted)
        except RuntimeError:  # the loop is closed: the run is gone
            while self.posted:
                self.cp.drop_grant(self.posted.popleft())

    def launch_posted(self):
        """(on the loop) Launch the units granted and not launched yet, in grant order."""
        posted = self.posted
        while posted:
            self._launch(posted.popleft())

    def _launch(self, u):
        if self.stopping or u.state != _GRANTED:
            if u.state == _GRANTED:
                self.cp.drop_grant(u)
            return
        self._inflight += 1
        lz = u.node.lazy
        if lz.injects and self.resources.missing(lz):
            return self.resources.start_after_setup(u)
        self._start(u)

    def drop_launched(self, u):
        """A launched unit will not start after all (its resources failed, or the run
        is stopping): give its grant back."""
        self.cp.drop_grant(u)
        self._inflight -= 1
        self._check_idle()

    def _start(self, u):
        lz = u.node.lazy
        task = lz.task
        kwargs = u.kwargs
        if lz.injects:
            kwargs = dict(kwargs)
            values = self.resources.values
            for p, r in lz.injects:
                kwargs[p] = values[r]
            if self.resources.homes and not task.is_async:
                home = self.resources.home_of(lz)
                if home is not None:  # a same_thread resource's thread (see resource())
                    call = self.resources.threads[home].call
                    try:
                        if lz.policy is not None and lz.policy.timeout is not None:
                            return call(self._sync_timed, _Deadline(u, lz.policy.timeout),
                                        task.fn, u.args, kwargs)
                        return call(self._sync_body, u, task.fn, u.args, kwargs)
                    except Exception as exc:
                        return self._body_finished(u, None, exc, time.perf_counter())
        if lz.policy is not None and lz.policy.timeout is not None:  # not the common case
            return self._start_timed(u, kwargs, lz.policy.timeout)
        try:
            if task.is_async:
                # A unit that holds a grant (slots, tokens: FIFO) is fused only if the
                # body tasks made before for such units have begun (the last one has:
                # tasks take their first step in the order made), so their bodies begin
                # in the order launched, which is the order granted (see launch;
                # regression: a unit granted as a body ended ran next in that body's
                # task, before units granted earlier whose tasks had not begun yet)
                if self._fuse_into is not None and self._fused is None and (
                        self._unbegun is None or not u.held):
                    u.body = self._fuse_into  # runs next in that task (see _async_body)
                    self._fused = (u, task.fn, u.args, kwargs)
                    self._fuse_left -= 1
                    if not self._fuse_refill:  # a budget per loop iteration
                        self._fuse_refill = True
                        self.loop.call_soon(self._refill_fusion)
                    return
                if u.held:  # (set before: an eager task factory begins it at once)
                    self._unbegun = u
                u.body = self._new_task(self._async_body(u, task.fn, u.args, kwargs))
                return
            if self._threaded:
                self._to_thread(self._sync_body, u, task.fn, u.args, kwargs)
                return
            # A remote executor cannot call back into this process before the body
            # begins, so the start gate is passed here, right before the hand-over (the
            # unit holds a slot of the window: see _Remote).
            if not self.cp.gate(u):
                return self._gate_refused(u)
            t0 = self._body_started(u)
            f = self._remote.submit(u, self._wire[task], u.args, kwargs)
        except Exception as exc:  # could not even start the body: the task fails
            self._body_finished(u, None, exc, time.perf_counter())
            return
        u.body = f  # its future: cancelled if the run stops first
        f.add_done_callback(functools.partial(self._remote_done, u, t0))

    # -- with_timeout ---------------------------------------------------------
    def _start_timed(self, u, kwargs, seconds):
        """``_start`` for a unit with a timeout (see ``LazyResult.with_timeout``). An
        async body runs in a task of its own (no fusion) under ``_timed_async``. A sync
        body gets a ``_Deadline``: whichever comes first, its return or the deadline,
        decides (under ``_late``); at the deadline the attempt fails while the body's
        slots pass to an ``_Overdue`` stand-in that gives them back when it returns."""
        task = u.node.lazy.task
        try:
            if task.is_async:
                if u.held:  # (see _start)
                    self._unbegun = u
                u.body = self._new_task(self._async_body(
                    u, functools.partial(self._timed_async, u, task.fn, seconds), u.args, kwargs))
                return
            d = _Deadline(u, seconds)
            if self._threaded:
                self._to_thread(self._sync_timed, d, task.fn, u.args, kwargs)
                return
            if not self.cp.gate(u):  # a remote body: as in _start
                return self._gate_refused(u)
            d.t0 = self._body_started(u)
            f = self._remote.submit(u, self._wire[task], u.args, kwargs)
        except Exception as exc:  # could not even start the body: the task fails
            self._body_finished(u, None, exc, time.perf_counter())
            return
        u.body = f
        d.handle = self.loop.call_later(seconds, self._overdue, d)
        f.add_done_callback(functools.partial(self._remote_timed_done, d))

    async def _timed_async(self, u, fn, seconds, /, *args, **kwargs):
        """An async body under a deadline: at the deadline its task is cancelled, and
        the cancellation becomes the attempt's TimeoutError (a cancellation of the run
        meanwhile stays a cancellation)."""
        task = asyncio.current_task()
        fired = []
        h = self.loop.call_later(seconds, lambda: fired.append(task.cancel()))
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            if not fired or self.stopping:
                raise
            if hasattr(task, "uncancel"):  # 3.11+: the task is not being cancelled any more
                task.uncancel()
            raise _timed_out(u, seconds) from None
        finally:
            h.cancel()

    def _sync_timed(self, d, fn, args, kwargs):
        # _sync_body (in a worker thread) with a deadline, armed on the loop once the
        # body has begun.
        u = d.unit
        if not self.cp.gate(u):
            return self._post(u, _REFUSED, None, 0.0)
        t0 = d.t0 = time.perf_counter()
        self._post(u, _STARTED, None, t0)
        try:
            self.loop.call_soon_threadsafe(self._arm, d)
        except RuntimeError:  # its loop is gone
            pass
        try:
            value, exc = fn(*args, **kwargs), None
        except BaseException as e:
            value, exc = None, e
        return self._timed_returned(d, value, exc)

    def _remote_timed_done(self, d, f):
        # _remote_done for a body with a deadline.
        try:
            value, exc = f.result(), None
        except BaseException as e:
            value, exc = None, self._remote.explain(e, d.unit)
        self._timed_returned(d, value, exc)

    def _arm(self, d):
        with self._late:
            if d.state == _IN_TIME:
                left = d.seconds - (time.perf_counter() - d.t0)
                d.handle = self.loop.call_later(max(left, 0.0), self._overdue, d)

    def _overdue(self, d):
        """On the loop, at the deadline of a sync body still running: the attempt fails
        with TimeoutError now; its slots pass to an _Overdue stand-in, counted in flight
        until the body returns (so the run's end waits for it, up to stop_grace)."""
        u = d.unit
        with self._late:  # against _timed_returned and _abandon
            if d.state != _IN_TIME or self._settled:
                return
            d.state = _LATE
            d.ghost = _Overdue(self, u.node, u.index, (), _NO_KWARGS, u.key)
            d.ghost.attempt = u.attempt
            self.cp.hand_over(u, d.ghost)
        self._inflight += 1
        if self._remote is not None and not u.node.lazy.task.is_async and u.body is not None:
            self._remote.cancel([u.body])  # not begun: never will; begun: runs on
        self._body_finished(u, None, _timed_out(u, d.seconds), d.t0)

    def _timed_returned(self, d, value, exc):
        """The body of ``d`` returned (any thread): reported as usual if in time;
        after its deadline only its stand-in's slots go back."""
        with self._late:
            state = d.state
            if state == _IN_TIME:
                d.state = _RETURNED
                handle = d.handle
            else:
                gone = self._settled
                if not gone:
                    d.ghost.back = True  # (read by _abandon)
        if state == _IN_TIME:
            if handle is not None:
                try:
                    self.loop.call_soon_threadsafe(handle.cancel)
                except RuntimeError:
                    pass
            return self._returned(d.unit, value, exc, d.t0)
        ghost = d.ghost
        _log.debug("task %r (%s) of run %s returned %.3gs after its timeout; its slots are "
                   "free", ghost.key.name, ghost.id, self.run_id,
                   time.perf_counter() - d.t0 - d.seconds)
        self.cp.release(ghost)  # from this thread (see _returned)
        if gone:
            return _LEAVE  # (_abandon counted its thread as abandoned)
        self._post(ghost, _REFUSED, None, 0.0)  # the loop: one body fewer in flight

    async def _async_body(self, u, fn, args, kwargs):
        """Run an async body in its asyncio task; then, after a success, the next async
        body that becomes ready (a dependent, or the next ready node) runs in the same
        task (fusion, as Dask fuses linear chains): a chain or a fan-out costs fewer
        asyncio tasks and loop iterations. The run fuses at most PUMP_CHUNK bodies per
        loop iteration, so the loop keeps its turns; never after a failure or a
        cancellation; every fused body passes the start gate like any other. A fused
        body sees the context (contextvars) that a task created at that point would."""
        task = u.body
        if self._unbegun is u:  # (see _start) the last such body task made begins
            self._unbegun = None
        while True:
            # The start gate. Without any gated constraint the check needs no lock:
            # reading the count is atomic, and a pause that returned before this line is
            # seen here (the locked check in gate() has the same linearization point:
            # this check). The body begins in this same step: nothing slips in between.
            if self.cp._gates or self.stopping:
                if not self.cp.gate(u):
                    return self._gate_refused(u)
            else:
                u.begin()
                if self.cp._gates:  # a limit was set just now: it must count this body
                    self.cp.began_unlocked(u)
            t0 = self._body_started(u)
            try:
                value = await fn(*args, **kwargs)
            except BaseException as exc:
                # KeyboardInterrupt and SystemExit too: they fail the run, which raises
                # them once it has cleaned up (regression: re-raised here, they stopped
                # the loop mid-run, so the run never finished and its handle never
                # resolved).
                self._body_finished(u, None, exc, t0)
                return
            if self._fuse_left > 0:
                self._fuse_into = task
                try:
                    self._body_finished(u, value, None, t0)
                    if self._fused is None and self._ready and not self._pumping:
                        self._take_next()  # nothing of ours became ready
                except BaseException:  # (a subscriber's KeyboardInterrupt, say)
                    if self._fused is not None:  # the unit meant to run next: not lost
                        (nxt, *_), self._fused = self._fused, None
                        self.drop_launched(nxt)
                    raise
                finally:
                    self._fuse_into = None
            else:
                self._body_finished(u, value, None, t0)
            if self._fused is None:
                return
            (u, fn, args, kwargs), self._fused = self._fused, None

    def _sync_body(self, u, fn, args, kwargs):
        # Runs in a worker thread: everything it learns goes back through _post.
        if self.cp._gates or self.stopping:
            if not self.cp.gate(u):
                return self._post(u, _REFUSED, None, 0.0)
        else:
            u.begin()
            if self.cp._gates:  # a limit was set just now: it must count this body
                self.cp.began_unlocked(u)
        t0 = time.perf_counter()
        self._post(u, _STARTED, None, t0)
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            return self._returned(u, None, exc, t0)
        return self._returned(u, value, None, t0)

    def _remote_done(self, u, t0, f):
        # In the thread that completed the future (a pool's, the Dask client's loop).
        try:
            value, exc = f.result(), None
        except BaseException as e:
            value, exc = None, self._remote.explain(e, u)
        self._returned(u, value, exc, t0)

    def _returned(self, u, value, exc, t0):
        """A worker thread: the body returned (or raised). Reported to the loop as usual,
        unless the run has abandoned it meanwhile: then only its slots are given back,
        and its thread of our pool leaves (the pool replaced it)."""
        with self._late:  # against _abandon: in time, or abandoned; never both
            if not self._settled:
                return self._post(u, value, exc, t0)
        _log.debug("abandoned task %r (%s) of run %s returned at last; its slots are free",
                   u.key.name, u.id, self.run_id)
        # Released here, in the body's thread: release works under the control plane's
        # lock from any thread (regression: handed to the run's loop, the release was
        # lost when that loop closed just then, and the slot stayed held for good).
        self.cp.release(u)
        return _LEAVE

    def _post(self, u, value, exc, t0):
        # Messages from worker threads are batched: one loop wake-up drains many.
        # Order matters: append before reading the flag here, clear the flag before
        # draining there, so no message is ever left behind.
        self._inbox.append((u, value, exc, t0))
        if not self._drain_pending:
            self._drain_pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                pass

    def _refill_fusion(self):
        self._fuse_refill = False
        self._fuse_left = self.PUMP_CHUNK

    def _drain(self):
        self._drain_pending = False
        inbox = self._inbox
        if self._gone:  # only starts and refusals come now: the run is over for them
            return inbox.clear()
        while inbox:
            u, value, exc, t0 = inbox.popleft()
            if value is _STARTED:
                self._body_started(u)
            elif value is _REFUSED:
                self._gate_refused(u)
            else:
                self._body_finished(u, value, exc, t0)

    def _body_started(self, u):
        """On the loop: the body begins (a sync body: has begun). Counts it, reports it;
        returns the perf_counter start when a duration will be reported."""
        if self._gone:
            return time.perf_counter()
        u.node.tally[_RUNNING] += 1
        rep = self.report
        if rep.version != rep.bus.version:
            rep.refresh()
        if rep.on_start:
            rep.started(u)
        return time.perf_counter()

    def _gate_refused(self, u):
        """A granted unit did not start: its run is stopping, or a pause came first (or
        the body of an _Overdue stand-in came back: one body fewer in flight)."""
        self._inflight -= 1
        if self._cut and u in self._cut:  # cancelled: DROPPED at the gate -> SKIPPED
            with self.cp.lock:
                u.cut()
            self._cut_end(u)
        elif u.state == _WAITING and not u.reported:
            self.report.blocked(u)
        self._check_idle()

    def _body_finished(self, u, value, exc, t0):
        """A body returned or raised (or could not start): decide, once, what becomes of
        the unit: done, a retry, or a failure that fails the run."""
        if self._gone:  # an abandoned async body ended at last: only its slots go back
            return self.cp.release(u)
        if self._cut and u in self._cut:  # cancelled meanwhile: its result is dropped
            return self._cut_finished(u)
        if exc is None:
            if isinstance(value, LazyResult):  # a graph to run for the value (rare)
                return self._returned_graph(u, value, t0)
            outcome = _DONE
        elif isinstance(exc, Backoff) and not self.stopping:  # not a failure (rare)
            return self._backoff(u, exc)
        else:
            policy = u.node.lazy.policy
            outcome = (_RETRYING if policy and u.attempt < policy.attempts and not self.stopping
                       and (policy.on is None or isinstance(exc, policy.on)) else _FAILED)
            caught = False
            if outcome == _FAILED and not self.stopping:
                if policy and policy.catch:  # .return_exceptions(): the exception is its value
                    caught = True
                else:
                    # Stop first: the slot this unit gives back must not start anybody
                    # (regression: a waiter was granted and began before the run failed).
                    self._fail(exc, u.id, u.key.name)
        if self.cp._adaptive and u.held:  # adaptive limits learn from it (rare)
            self.cp.observe(u, exc, time.perf_counter() - t0)
        self.cp.release(u)
        self._inflight -= 1
        u.body = None  # a finished asyncio task (and its coroutine) can go now
        u.end(outcome)
        if outcome == _DONE:
            if self._stored is not None:  # (a failing run too keeps what finished)
                self._record(u, value)
            rep = self.report
            if rep.on_finish or rep.version != rep.bus.version:
                rep.finished(u, time.perf_counter() - t0, None)
            if self.stopping:
                return self._check_idle()
            self._settle_value(u.node, u.index, value)
        elif outcome == _RETRYING:
            policy = u.node.lazy.policy
            wait = policy.delay * policy.backoff ** (u.attempt - 1)
            if policy.jitter:
                wait *= random.uniform(1 - policy.jitter, 1 + policy.jitter)
            self.report.retrying(u, policy.attempts, wait, exc)
            u.attempt += 1
            if wait > 0:
                self._timers[u] = self.loop.call_later(wait, self._retry, u)
            else:
                self._retry(u)
        else:
            self.report.finished(u, time.perf_counter() - t0, exc)
            if caught and not self.stopping:
                # .return_exceptions(): failed for good (and reported so), its exception
                # is its value
                self._settle_value(u.node, u.index, exc)
            self._check_idle()

    def _settle_value(self, node, index, value):
        """``value`` is the value of ``node`` (a plain call: ``index`` None) or of its
        item ``index`` (a map's); the node settles once its last item has."""
        if index is None:
            node.value = value
            self._settle_node(node, None)
        else:
            node.value[index] = value
            node.left -= 1
            if node.out is not None:  # pipelined maps wait for this item
                self._item_out(node, index)
            if not node.left:
                self._settle_node(node, None)

    def _backoff(self, u, exc):
        """``u``'s body raised cs.Backoff: pause its scope (first, so the slot given back
        here starts none of its tasks), then queue the unit again at once: the pause
        holds it, and it takes no attempt. A Backoff that names no valid pause fails the
        task as any error would."""
        scope = exc.scope or f"task:{u.key.name}"
        try:
            self.engine._backoff(scope, exc.retry_after)
        except CascadeError as bad:
            bad.__cause__ = exc
            return self._body_finished(u, None, bad, time.perf_counter())
        self.cp.release(u)
        self._inflight -= 1
        u.body = None
        u.end(_RETRYING)
        policy = u.node.lazy.policy
        self.report.retrying(u, policy.attempts if policy else 1, exc.retry_after, exc)
        self._retry(u)

    def _note_priorities(self, special):
        """Priorities of the graph just built (``special``: its nodes with a policy,
        among others; the tasks with a priority of their own are in the tallies): the
        readiness stamp of such a node is offset by it (see LazyResult.with_priority).
        ``_prio`` stays empty, and costs nothing, in a run without priorities."""
        for n in special:
            policy = n.lazy.policy
            if policy is not None and policy.priority is not None:
                self._prio[n] = int(policy.priority * 1e9) << 20
        for task in self.tallies:
            if task.priority and task not in self._prio:
                self._prio[task] = int(task.priority * 1e9) << 20

    def _prioritized(self, obj):
        """Now as a readiness stamp, less the priority of ``obj`` (a node, or what
        stands for one of its items, which has its ``node``)."""
        node = obj if type(obj) is _Node else obj.node
        off = self._prio.get(node)  # (its with_priority, else its task's, else none)
        return self._stamp() - (self._prio.get(node.lazy.task, 0) if off is None else off)

    def _retry(self, u):
        self._timers.pop(u, None)
        if not self.stopping:
            # ready again now: behind who waits already (less its priority)
            u.seq = self._stamp() if not self._prio else self._prioritized(u.node)
            self._submit((u,))

    def close(self):
        """From any thread: the engine is closing, so this run stops as on a failure."""
        def stop():
            if not self.stopping:
                self.error = self.error or CascadeError(
                    f"engine.close() was called during run {self.run_id}")
                self._stop()
        try:
            self.loop.call_soon_threadsafe(stop)
        except RuntimeError:  # its loop has closed: nothing left to stop
            pass

    def _fail(self, exc, task_id, name):
        if self.error is None:
            self.error = exc
            self.failed_id = task_id
            if hasattr(exc, "add_note"):
                exc.add_note(f"cascade: raised by task {name!r} ({task_id}) in run {self.run_id}")
        self._stop()

    def _stop(self):
        """Fail-fast and cancellation: start nothing more, cancel running async bodies."""
        if self.stopping:
            return
        self.stopping = True
        self._stopped_at = time.perf_counter()
        self.cp.drop_run(self)
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        self.resources.cancel_setups()
        for check in list(self._checks):
            check.cancel()
        handed = []  # remote futures: cancelled together (Dask: one message)
        for u in self.cp.holders_of(self):
            if u.state == _RUNNING and u.body is not None:
                if self._remote is not None and not u.node.lazy.task.is_async:
                    handed.append(u.body)
                else:
                    u.body.cancel()
        if handed:
            try:
                self._remote.cancel(handed)
            except Exception:  # the run ends all the same: they run to their end, or
                _log.warning("run %s could not cancel its %d futures on the %s",  # stop_grace
                             self.run_id, len(handed), self._remote.name, exc_info=True)
        if not self._wake.done():
            self._wake.set_result(None)

    def _check_idle(self):
        if self.stopping and not self._inflight and self._idle and not self._idle.done():
            self._idle.set_result(None)

    async def _wait_for_bodies(self):
        """Wait until every started body has finished, for at most ``stop_grace``
        seconds; a cancellation meanwhile (a second cancel(), a second Ctrl-C) ends the
        wait at once. Then the bodies still running are abandoned. Returns whether a
        cancellation arrived, for the caller to raise once its clean-up is done."""
        grace = self.engine._stop_grace
        timer = None
        if self._inflight > 0 and grace is not None:
            timer = self.loop.call_later(grace, self._abandon)
        cancelled = False
        while self._inflight > 0:
            self._idle = self.loop.create_future()
            try:
                await self._idle
            except asyncio.CancelledError:
                cancelled = True
                self._abandon()
        if timer is not None:
            timer.cancel()
        return cancelled

    def _abandon(self):
        """Stop waiting for the bodies still running (a sync body cannot be interrupted,
        an async one may ignore its cancellation). Each is logged (one warning), counted
        failed and reported so (TaskExecutionFinished); it runs on, and keeps its slots
        until it returns (see _returned), so no limit is ever exceeded. A granted body
        that has not begun never will: its grant goes back."""
        if self._gone:
            return
        with self._late:
            self._settled = True  # from now on, a body that returns finds it abandoned
        self._drain()  # those that returned in time (reported under the lock): as usual
        self._gone = True
        waited = time.perf_counter() - self._stopped_at
        lost = 0
        for u in sorted(self.cp.holders_of(self), key=operator.attrgetter("seq")):
            if u.state == _GRANTED:
                self.cp.drop_grant(u)
                continue
            if u.state != _RUNNING:
                continue
            if type(u) is _Overdue:  # timed out, reported then; it returns on its own
                if not u.back:
                    home = self.resources.home_of(u.node.lazy) if self.resources.homes else None
                    if home is not None:  # on a same_thread resource's thread (regression:
                        self.resources.stuck.add(home)  # its tear-down was queued behind
                    else:  # the body, whose thread then left: the run never ended)
                        lost += isinstance(self._pool, _Workers)
                    _log.warning("task %r (%s) of run %s timed out and its body has not "
                                 "returned within stop_grace=%ss of the run stopping; it "
                                 "is abandoned and keeps its slots until it returns",
                                 u.key.name, u.id, self.run_id, self.engine._stop_grace)
                continue
            task = u.node.lazy.task
            where = ("as an asyncio task" if task.is_async else
                     "in its thread" if self._threaded else "in the executor")
            err = CascadeError(
                f"task {u.key.name!r} ({u.id}) of run {self.run_id} did not return within "
                f"stop_grace={self.engine._stop_grace}s of the run stopping; it is abandoned: "
                f"it runs on {where} until it returns, and holds its concurrency slots "
                "until then")
            _log.warning("%s", err)
            t = u.node.tally
            t[_RUNNING] -= 1
            t[_FAILED] += 1  # (its state stays RUNNING: release() must know it began)
            self.report.finished(u, waited, err)
            home = self.resources.home_of(u.node.lazy) if self.resources.homes else None
            if home is not None:  # on a same_thread resource's thread: not the pool's
                self.resources.stuck.add(home)
                continue
            lost += not task.is_async and isinstance(self._pool, _Workers)
        if lost:
            self._pool.abandon(lost)
        self._inflight = 0
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    # -- engine.cancel ---------------------------------------------------------
    def cancel(self, scope):
        """On the loop: cancel (engine.cancel) every task of this run matched by ``scope``
        that has not finished; each ends SKIPPED with reason ``cancelled: <scope>`` and its
        skip propagates as usual. Returns how many units it cut: each waiting, granted,
        running or retrying unit, each item of a map not made yet, and each call not
        processed yet (its inputs are not all done: it is skipped when they are, it never
        runs). A granted unit is refused at the start gate (a count of ``cp._gates`` sends
        every body through it meanwhile); a running async body's asyncio task is
        cancelled; a remote body's future is cancelled (one that has begun runs on); a
        sync body runs to its end. Their results are dropped (_cut_finished)."""
        if self.stopping or not self.nodes:
            return 0
        cp, project = self.cp, self.cp.project
        reason = f"cancelled: {scope}"
        memo = {}

        def hit(task):
            m = memo.get(task)
            if m is None:
                m = memo[task] = _scope_matches(
                    scope, self.keys.get(task) or _Key(task.name, task.tags, self.run_id), project)
            return m
        pulled, held = cp.pull(self, lambda key: _scope_matches(scope, key, project))
        # (by its unit's key: a keyed call's has its key values; regression: a 'key:'
        # scope missed the retrying calls, which then ran again)
        retrying = [u for u in self._timers if _scope_matches(scope, u.key, project)]
        for u in retrying:
            self._timers.pop(u).cancel()
            t = u.node.tally
            t[_RETRYING] -= 1
            t[_SKIPPED] += 1
            u.state = _SKIPPED
        handed = []
        for u in held:
            if u.state == _RUNNING and u.body is not None:
                if self._remote is not None and not u.node.lazy.task.is_async:
                    handed.append(u.body)
                else:
                    u.body.cancel()  # (a granted one's task: refused at its gate)
        if handed:
            try:
                self._remote.cancel(handed)  # not begun: never will; begun: runs on
            except Exception:
                _log.warning("run %s could not cancel %d futures on the %s", self.run_id,
                             len(handed), self._remote.name, exc_info=True)
        count = len(pulled) + len(held) + len(retrying)
        cut = {u.node for u in (*pulled, *held, *retrying)}
        if self._looking:  # units a store is being asked about (see _look_up)
            looking = [u for u in self._looking if hit(u.node.lazy.task)]
            count += len(looking)
            cut.update(u.node for u in looking)
        for node in list(self.nodes.values()):
            lz = node.lazy
            task = lz.task
            if task is None or node.pending < 0 or node.skip is not None or not (
                    node in cut or hit(task)):  # (a 'key:' scope hits units, not tasks)
                continue
            if node.key is None:  # not processed yet: skipped when it is (_process)
                node.skip = reason
                count += 1
            elif type(lz) is MappedLazyResult:
                pipe = node.pipe
                n = (pipe.n - pipe.made if pipe is not None else
                     len(node.value) - node.cursor if node.items is not None else 0)
                if n or node in cut:  # (else all its items ran: it waits for their graphs)
                    count += n
                    self._map_skipped(node, reason)
            elif node in cut:  # (else its body ran: it waits for the graph it returned)
                node.skip = reason
                self.report.skipped(node, reason)
                self._settle_node(node, _needs(node, reason))
        if scope.startswith("key:"):
            # a call's key values are known once its unit is made: the keyed calls not
            # made yet are matched then (_key_cut)
            nodes = {n for n in self.nodes.values() if n.lazy.task is not None
                     and n.lazy.task.keys and n.pending >= 0 and n.skip is None}
            if nodes:
                self._key_cuts.append((scope, reason, nodes))
        # (no pump here: a node marked that is ready already has a pump coming, and one
        # cancelled before the run's sync with the broker must not start anything)
        return count

    def _key_cut(self, u, key):
        """A fresh unit of a keyed task, whose key values are known now: if a cancel of a
        'key:' scope came while its node was unfinished and matches it, it ends SKIPPED
        instead of waiting (its node is skipped as cancel skips a node it cut)."""
        for scope, reason, nodes in self._key_cuts:
            node = u.node
            if node in nodes and _scope_matches(scope, key, self.cp.project):
                u.cut()
                if node.skip is None:
                    if type(node.lazy) is MappedLazyResult:
                        self._map_skipped(node, reason)
                    else:
                        node.skip = reason
                        self.report.skipped(node, reason)
                        self._settle_node(node, _needs(node, reason))
                return True
        return False

    def _cut_finished(self, u):
        """The body of a unit cut by ``cancel`` ended (returned, raised, was cancelled,
        or could not start): its slots go back, its result is dropped, it is SKIPPED."""
        self.cp.release(u)
        self._inflight -= 1
        u.body = None
        u.end(_SKIPPED)
        self._cut_end(u)
        self._check_idle()

    def _cut_end(self, u):
        """A cut unit is settled; the last one gives back the gate count it held."""
        self._cut.pop(u, None)
        if not self._cut and self._cut_gate:
            with self.cp.lock:
                self._cut_gate = False
                self.cp._gates -= 1

    # -- status -------------------------------------------------------------
    def counts(self):
        """{task name: {state: count}} right now, from the tallies (a snapshot: another
        thread may be a few transitions ahead)."""
        out = {}
        for task, t in list(self.tallies.items()):
            c = out.setdefault(task.name, collections.Counter())
            counts = _tally_counts(t)
            if self._remote is not None and not task.is_async and "running" in counts:
                counts["submitted"] = counts.pop("running")  # handed over (see _Remote)
            c.update(counts)
        return {k: dict(v) for k, v in out.items()}

    def totals(self):
        """{state: count} over all its tasks (see counts)."""
        return self.total_of(self.counts())

    @staticmethod
    def total_of(counts):
        """{state: count} over the tasks of ``counts()``."""
        out = collections.Counter()
        for c in counts.values():
            out.update(c)
        return dict(out)

    def scoped_tallies(self):
        """[(admission key, tally)] of every task, for scope matching in status."""
        return [(self.keys.get(task) or _Key(task.name, task.tags, self.run_id), t)
                for task, t in list(self.tallies.items())]


def _retrieved(fut):
    # Done callback: its outcome is read elsewhere, or not needed (a run that failed
    # first): asyncio must not log it as never retrieved.
    if not fut.cancelled():
        fut.exception()


def _cannot_send(remote, task, tried):
    """Why ``task`` cannot be sent to ``remote``'s workers, and the fix. ``tried``: the
    error of each way tried, with whether it pickled here (and a worker could not load
    it)."""
    fn = task.fn
    (exc, loaded), main = tried[-1], task.__module__ in ("__main__", "__mp_main__")
    if getattr(fn, "__name__", "") == "<lambda>":
        fix = "it is a lambda: define it with def at the top level of a module"
    elif "<locals>" in getattr(fn, "__qualname__", ""):
        fix = "it is defined inside a function: define it at the top level of a module"
    elif isinstance(exc, ModuleNotFoundError):
        fix = (f"the workers cannot import module {exc.name!r}: install it where they run"
               + (", or send it with client.upload_file(path)"
                  if isinstance(remote, _Dask) else ""))
    elif main and (loaded or len(tried) > 1):
        fix = ("it is defined in the main script but not at its top level (under "
               "`if __name__ == \"__main__\":`, say), which a worker process imports "
               "without running that block: move the def to the top level of the script, "
               "or into a module")
        if len(tried) > 1:
            fix += ", or make what it refers to picklable (it is then sent by value)"
    else:
        fix = "define it with def at the top level of a module that the workers can import"
    why = "; then ".join(f"{type(e).__name__}: {e}" for e, _ in tried)
    return f"task {task.name!r} cannot be sent to the {remote.name} ({why}): {fix}"


def _check_amount(caps, lz, name, amount):
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ConstraintError(f"{lz.name}.with_constraints({name}=...) resolved to "
                              f"{amount!r}; need an int >= 0")
    if name not in caps:
        raise ConstraintError(f"{lz.name}.with_constraints({name}={amount}): no system "
                              f"resource {name!r}; declare it with "
                              f"Engine(system_resources={{{name!r}: n}})")
    if amount > caps[name].total:
        raise ConstraintError(f"{lz.name}.with_constraints({name}={amount}) asks for more "
                              f"than the total capacity {caps[name].total} of {name!r}")
    return amount


def _new_run_id():
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


def _as_target(target):
    if isinstance(target, LazyResult):
        return target
    if type(target) in (list, tuple, dict):
        return _Gather(None, (target,))
    raise TypeError(f"run() needs a lazy result (call a @cs.task function to get one) or a "
                    f"list/tuple/dict of them, got {type(target).__name__}")


class _Escaped(Exception):
    """Carries a run's KeyboardInterrupt or SystemExit to its RunHandle: raised raw in a
    task, asyncio would stop the loop instead (its callbacks, the handle's, never run)."""

    def __init__(self, exc):
        super().__init__(exc)
        self.exc = exc


async def _contained(coro):
    try:
        return await coro
    except (KeyboardInterrupt, SystemExit) as exc:
        raise _Escaped(exc) from None


class _Cancels:
    """Cancels an asyncio task from any thread, each request counting: a request that
    comes before the last one has reached the task (two Ctrl-C in quick succession)
    waits for it, so the second is a second cancellation (a run's "stop waiting for
    its bodies"), not lost in the first (Task.cancel() twice before the task has run
    once delivers one CancelledError)."""

    def __init__(self, loop, task):
        self.loop, self.task = loop, task
        self.busy = False  # a cancel is on its way to the task

    def request(self):
        """From any thread; raises RuntimeError if the loop is closed."""
        self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self):
        if self.task.done():
            return
        if self.busy:  # after the task's next step, which the last cancel scheduled
            self.loop.call_soon(self._cancel)
            return
        self.busy = True
        self.task.cancel()
        self.loop.call_soon(self._reached)

    def _reached(self):
        self.busy = False


class RunHandle:
    """A run started with ``engine.start``: ``result(timeout)``, ``done()``, ``cancel()``,
    ``run_id``, and ``await handle``."""

    def __init__(self, run_id, loop):
        self.run_id = run_id
        self._loop = loop
        self._task = None
        self._future = concurrent.futures.Future()
        self._target = None   # what it runs, for graph()
        self._run = None      # its _Run while it runs (set by Engine._run) ...
        self._states = None   # ... then each node's state when it ended (see _ended)
        self._counts = None   # ... and its final counts

    def _attach(self, task):
        self._task = task
        self._cancels = _Cancels(self._loop, task)
        task.add_done_callback(self._mirror)

    def _mirror(self, task):
        f = self._future
        if task.cancelled():
            f.cancel()
        elif task.exception() is not None:
            exc = task.exception()
            f.set_exception(exc.exc if isinstance(exc, _Escaped) else exc)
        else:
            f.set_result(task.result())

    def result(self, timeout: Optional[float] = None) -> Any:
        """The run's value; raises its error, or ``concurrent.futures.CancelledError``."""
        if not self._future.done():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._loop:
                raise CascadeError("handle.result() would block the event loop this run "
                                   "lives on; use `await handle` instead")
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            f = self._future
            if f.done() and not f.cancelled() and f.exception() is exc:
                # The run's own error (with_timeout's TimeoutError is this class from
                # 3.11 on; regression: it was reported as "still running after Nones").
                raise
            # the builtin on every version (they are one class only from 3.11 on)
            raise TimeoutError(f"run {self.run_id} still running after {timeout}s") from None

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Cancel the run: nothing more starts, async bodies are cancelled, resources are
        torn down once every started body has settled (or been abandoned, after the
        engine's ``stop_grace``; cancelling again abandons them at once); RunFinished
        says "Cancelled"."""
        if self._future.done():
            return False
        try:
            self._loop.call_soon_threadsafe(lambda: self._task and self._cancels.request())
        except RuntimeError:
            return False
        return True

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def graph(self, collapse: Optional[bool] = None) -> Any:
        """The run's graph coloured by each node's state now: pending, waiting (ready,
        not admitted yet, or waiting out a retry delay), running, done, cached, skipped,
        failed; a map or a group of calls shows its items done. During the run it is a
        snapshot (ask again for a fresh one); after it, the states it ended with (the
        run itself is let go, with its values). Has ``to_svg()``, ``to_dot()``,
        ``to_mermaid()``; a notebook draws it inline; ``cs.visualize(handle, path)``
        writes it. Graphs that tasks returned while running are not drawn."""
        run = self._run
        states = self._states if run is None else _draw_states(run)
        return _Drawing(self._target, states if states is not None else {}, collapse,
                        title=f"run {self.run_id}")

    def _ended(self, run):  # on the run's loop, as it ends: O(nodes), once
        self._counts = run.counts()
        try:
            self._states = _draw_states(run)
        except Exception:  # (a drawing must never break a run's ending)
            _log.exception("run %s: its node states could not be kept for handle.graph()",
                           run.run_id)
        self._run = None

    def _state(self):
        f = self._future
        return ("running" if not f.done() else "cancelled" if f.cancelled() else
                "failed" if f.exception() else "done")

    def __repr__(self):
        return f"<RunHandle {self.run_id} {self._state()}>"

    def _repr_html_(self):
        """A notebook's view: its state, its counts per task so far, its error."""
        state, run = self._state(), self._run
        counts = run.counts() if run is not None else self._counts
        sections = [_count_section("tasks", "task", counts or {})]
        if state == "failed":
            sections.append(("error", ["error"], [[_error_text(self._future.exception(),
                                                               "full")]]))
        elif counts is None and state == "running":
            state = "starting"  # (its loop has not begun it yet)
        return _html(f"Run {self.run_id}: {state}", sections)


class _ExitWait:
    """Runs that ``engine.start`` began on a helper thread (daemon threads), which the
    interpreter waits for at exit, as concurrent.futures waits for a ThreadPoolExecutor's
    work: a script that starts a run and returns gets its run done, not dropped.

    The wait is registered with threading's exit hook (``threading._register_atexit``,
    as concurrent.futures.thread does), which runs before the interpreter joins its
    threads and while it can still start threads (a run's pool starts them on demand);
    plain ``atexit`` runs after that. Ctrl-C during the wait cancels every run still
    going (each cleans up: nothing more starts, resources are torn down once its
    bodies have settled, waiting up to ``stop_grace``); a second cancels them again
    (the wait for their running bodies ends at once); a third gives up on them."""

    def __init__(self):
        self.handles = set()
        self.hooked = False
        self.lock = threading.Lock()

    def add(self, handle):
        with self.lock:
            if not self.hooked:
                self.hooked = True
                try:
                    threading._register_atexit(self.wait)
                except (AttributeError, RuntimeError):  # no such hook, or exiting already
                    import atexit  # (built in, and imported by site already)
                    atexit.register(self.wait)
            self.handles.add(handle)
        handle._future.add_done_callback(lambda _: self.handles.discard(handle))

    def wait(self):
        # A Ctrl-C may land anywhere in here, also while the runs are being cancelled:
        # each is counted, and acted on (in order) at the top of the loop.
        interrupts = acted = 0
        waited = []
        sent = {}  # handle -> how many cancels it got (one per Ctrl-C, at most two)
        while True:
            try:
                left = [h for h in list(self.handles) if not h.done()]
                waited.extend(h for h in left if h not in waited)
                if not left or interrupts > 2:
                    break
                if not interrupts:
                    _log.info("waiting at exit for %d run(s) started with engine.start(): "
                              "%s (Ctrl-C cancels)", len(left), ", ".join(h.run_id for h in left))
                while acted < min(interrupts, 2):
                    acted += 1
                    _log.warning("Ctrl-C: %s %d run(s) started with engine.start(): %s",
                                 "cancelling" if acted == 1 else
                                 "no longer waiting for the running bodies of", len(left),
                                 ", ".join(h.run_id for h in left))
                for h in left:  # (counted per handle: a Ctrl-C may land between two)
                    while sent.get(h, 0) < min(interrupts, 2):
                        h.cancel()
                        sent[h] = sent.get(h, 0) + 1
                for h in left:  # (not futures.wait(): it misses a cancel() of the future)
                    if not h._future.cancelled():
                        h._future.exception()
            except concurrent.futures.CancelledError:
                pass
            except KeyboardInterrupt:
                interrupts += 1
        for h in waited:  # nobody can ask for these results any more: a failure is said
            f = h._future
            if f.done() and not f.cancelled() and f.exception() is not None:
                e = f.exception()
                _log.error("run %s (started with engine.start()) failed at exit: %s: %s",
                           h.run_id, type(e).__name__, _printable(e))


_wait_at_exit = _ExitWait()


def _serve(loop):
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class _Status(dict):
    """``engine.status()``: a dict snapshot that prints as a table (and shows as HTML
    tables in a notebook). The rows of both come from ``_controls`` and the dict."""

    def _controls(self):
        """(type, scope, usage, seconds left or None, shadowed or None, from the broker)
        of each control in force."""
        return [(s["type"], s["scope"], _CONTROL_TYPES[s["type"]].shows(s), s["expires_in"],
                 s.get("shadowed"), s.get("origin") == "broker") for s in self["scopes"]]

    def __repr__(self):
        lines = [f"Engine status: {len(self['runs'])} active run(s)"]
        if self["tasks"]:
            lines.append("  tasks:")
            for name, counts in sorted(self["tasks"].items()):
                lines.append(f"    {name:<24} " + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if self["scopes"]:
            lines.append("  constraints:")
            for kind, scope, use, left, shadowed, broker in self._controls():
                left = "" if left is None else f"  ({left:.1f}s left)"
                where = "  (from the broker" + (f"; the engine's own: {shadowed})"
                                               if shadowed else ")")
                lines.append(f"    {kind:<12} {scope:<24} {use}{left}"
                             f"{where if broker else ''}")
        for k, c in self["capacities"].items():
            lines.append(f"  capacity {k}: {c['in_use']}/{c['total']} in use")
        w = self.get("window")
        if w:
            lines.append(f"  window of the {w['executor']}: {w['submitted']}/{w['size']} "
                         "submitted")
        if self.get("history"):
            lines.append("  finished runs (newest first):")
            for h in self["history"][:5]:
                lines.append(f"    {h['run_id']:<28} {h['status']:<9} {h['duration']:.2f}s"
                             + (f"  {h['error']}" if h.get("error") else ""))
        if self["blocked"]:
            total = sum(c.get("blocked", 0) for c in self["tasks"].values())
            lines.append(f"  blocked ({total}):")
            for b in self["blocked"][:20]:
                lines.append(f"    {b['task_id']:<28} waits on {_printable(b['waits_on'])}")
            if total > 20:
                lines.append(f"    ... {total - 20} more")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):
        p.text(repr(self))

    def _sections(self):
        """The HTML view's sections (see _html): tasks, blocked groups, controls,
        capacities, the executor's window and the finished runs."""
        blocked = sum(c.get("blocked", 0) for c in self["tasks"].values())
        w = self.get("window")
        return [
            _count_section("tasks", "task", self["tasks"]),
            (f"blocked ({blocked}), by task and what it waits on", ["task", "waits on", "count"],
             [[g["task_name"], g["waits_on"], g["count"]] for g in self.get("waiting", ())]),
            self._controls_section(),
            ("capacities", ["capacity", "in use", "total"],
             [[k, c["in_use"], c["total"]] for k, c in self["capacities"].items()]),
            ("window", ["executor", "submitted", "size"],
             [[w["executor"], w["submitted"], w["size"]]] if w else []),
            ("finished runs (newest first)", ["run", "status", "duration", "error"],
             [[h["run_id"], h["status"], f"{h['duration']:.2f}s", h.get("error") or ""]
              for h in self.get("history", ())]),
        ]

    def _controls_section(self):
        return ("controls in force", ["type", "scope", "usage", "time left", "from"],
                [[kind, scope, use, "" if left is None else f"{left:.1f}s",
                  ("broker" + (f" (the engine's own: {shadowed})" if shadowed else ""))
                  if broker else "engine"]
                 for kind, scope, use, left, shadowed, broker in self._controls()])

    def _repr_html_(self):
        runs = self["runs"]
        return _html(f"Engine status: {len(runs)} active run(s)"
                     + (f": {', '.join(runs[:5])}" + (" ..." if len(runs) > 5 else "")
                        if runs else ""), self._sections())


# The states of a run's counts, in the order a unit goes through them ("submitted":
# handed to a remote executor, see _Run.counts).
_SHOWN_STATES = _STATE_NAMES[:4] + ("submitted",) + _STATE_NAMES[4:]


def _count_section(title, first, counts):
    """A section (see _html) of {name: {state: count}}: a row per name, a column per
    state any of them has, in _SHOWN_STATES order (a zero is left blank)."""
    seen = {k for c in counts.values() for k in c}
    cols = [k for k in _SHOWN_STATES if k in seen] + sorted(seen.difference(_SHOWN_STATES))
    return (title, [first, *cols],
            [[name, *(c.get(k) or "" for k in cols)] for name, c in sorted(counts.items())])


_HTML_ROWS = 100  # rows a notebook table shows; a last row says how many more there are
_HTML_LINE = ' style="border-bottom:1px solid rgba(127,127,127,.3)"'  # a table row's


def _html(caption, sections):
    """The notebook view (``_repr_html_``) of a status, an engine, a run handle and the
    live progress of cs.run: a caption, then a table per section ``(title, header,
    rows)`` that has rows (the model of _status_sections). Every value is user data
    (task names, scopes, error text), so each is made printable and HTML-escaped; the
    CSS is inline, with no script and nothing loaded from elsewhere. Numbers align right."""
    import html  # (its entity table costs an import: only when a notebook asks)

    def esc(x):
        return html.escape(_printable(x), quote=True)

    out = ['<div style="font-family:monospace;font-size:12px;line-height:1.4">',
           f'<div style="font-weight:bold;margin:2px 0">{esc(caption)}</div>']
    for title, header, rows in sections:
        if not rows:
            continue
        more = len(rows) - _HTML_ROWS
        if more > 0:
            rows = rows[:_HTML_ROWS] + [[f"... {more} more"] + [""] * (len(header) - 1)]
        out.append('<table style="border-collapse:collapse;margin:4px 0 8px 0">')
        if title:
            out.append('<caption style="text-align:left;font-style:italic;padding:2px 0">'
                       f'{esc(title)}</caption>')
        out.append(f"<tr{_HTML_LINE}>" + "".join(
            f'<th style="padding:0 8px;text-align:left">{esc(h)}</th>' for h in header)
            + "</tr>")
        for row in rows:
            out.append(f"<tr{_HTML_LINE}>" + "".join(
                f'<td style="padding:0 8px{";text-align:right" if isinstance(v, (int, float)) else ""}">'
                f'{esc(v)}</td>' for v in row) + "</tr>")
        out.append("</table>")
    out.append("</div>")
    return "\n".join(out)


# ===========================================================================
# Fleet coordination: shared limits through a coordinator (Redis)
# ===========================================================================

# One round trip of an engine's pump for one shared control (KEYS: the control's
# bucket, holders, live engines, tickets, wanted counts, ticket counter; ARGV: kind
# "c" (concurrency) or "r" (rate), engine id, held (c: the permits this engine holds
# now, absolute; r: tokens it gives back), want, limit (c) or rate per second (r),
# burst (r), lease seconds, "1" to leave, "1" if the caller was registered before,
# lead (r: seconds of future tokens it may be handed, each to be spent at its time)).
# A caller registered before but no longer live (Redis lost its data: a restart
# without persistence, a failover; or the caller's lease ran out) means the holdings
# Redis counts may miss permits still held: no permit is granted to anyone until
# lease/2 later (``quiet``), by when every live engine has renewed its own. Reclaims the holdings and tickets of
# engines whose lease ran out, renews the caller's, then grants in ticket order: the
# caller gets what is free beyond the wants of the tickets ahead of its own; a caller
# not served in full keeps its ticket (its place). Redis TIME is the only clock.
# A rate's bucket may go into debt by rate x lead: a token handed out beyond those in
# the bucket is due when the bucket would have made it (the reply's last field: the
# tokens there were before the grant, so the j-th token granted is due (j - before) /
# rate seconds after now), so the tokens due by any time, less those given back, never
# exceed burst + rate x elapsed, and a pump that asks late loses none while it is at
# most ``lead`` late. Returns {granted, retry in µs (r: until its next token comes
# within ``lead``), fleet in use (c) or whole tokens left (r), engines holding the
# control, r: millionths of tokens in the bucket before the grant, and Redis's time in
# µs}.
_FLEET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local kind, me = ARGV[1], ARGV[2]
local held, want = tonumber(ARGV[3]), tonumber(ARGV[4])
local cap, burst, lease = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local bucket, holds, live, tickets, wants, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local quiet = KEYS[7]
local lead = tonumber(ARGV[10]) or 0
local dead = redis.call('ZRANGEBYSCORE', live, '-inf', now)
for _, e in ipairs(dead) do
  redis.call('HDEL', holds, e)
  redis.call('ZREM', tickets, e)
  redis.call('HDEL', wants, e)
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', live, '-inf', now) end
if ARGV[8] == '1' then
  redis.call('ZREM', live, me)
  redis.call('HDEL', holds, me)
  redis.call('ZREM', tickets, me)
  redis.call('HDEL', wants, me)
  return {0, 0, 0, redis.call('ZCARD', live)}
end
if kind == 'c' and ARGV[9] == '1' and not redis.call('ZSCORE', live, me) then
  redis.call('SET', quiet, tostring(now + lease / 2))
end
redis.call('ZADD', live, now + lease, me)
local free, used, tokens = 0, 0, 0
if kind == 'c' then
  if held > 0 then redis.call('HSET', holds, me, held) else redis.call('HDEL', holds, me) end
  for _, v in ipairs(redis.call('HVALS', holds)) do used = used + tonumber(v) end
  free = cap - used
  if now < (tonumber(redis.call('GET', quiet)) or 0) then free = 0 end
else
  local b = redis.call('HMGET', bucket, 'tokens', 'stamp')
  tokens = tonumber(b[1]) or burst
  local stamp = tonumber(b[2]) or now
  if now > stamp then tokens = math.min(burst, tokens + (now - stamp) * cap) end
  tokens = math.min(burst, tokens + held)
  free = tokens + lead * cap
end
local before = tokens
local grant, ahead = 0, 0
if want > 0 then
  if not redis.call('ZSCORE', tickets, me) then
    redis.call('ZADD', tickets, redis.call('INCR', seq), me)
  end
  for _, e in ipairs(redis.call('ZRANGE', tickets, 0, -1)) do
    if e == me then break end
    ahead = ahead + (tonumber(redis.call('HGET', wants, e)) or 0)
  end
  grant = math.max(0, math.min(want, math.floor(free - ahead)))
  if grant >= want then
    redis.call('ZREM', tickets, me)
    redis.call('HDEL', wants, me)
  else
    redis.call('HSET', wants, me, want - grant)
  end
else
  redis.call('ZREM', tickets, me)
  redis.call('HDEL', wants, me)
end
local retry, ttl = 0, lease * 2
if kind == 'c' then
  if grant > 0 then redis.call('HINCRBY', holds, me, grant) end
  used = used + grant
else
  tokens = tokens - grant
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'stamp', tostring(now))
  if grant < want then retry = math.max(0.0005, (ahead + 1 - free + grant) / cap) end
  used = math.max(0, math.floor(tokens))
  ttl = math.max(ttl, 2 * burst / cap)
end
local ms = math.ceil(ttl * 1000) + 1000
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ms) end
return {grant, math.ceil(retry * 1000000), used, redis.call('ZCARD', live),
        math.floor(before * 1000000), math.floor(now * 1000000)}
"""


class RedisCoordinator:
    """Shared limits for a fleet of engines, kept in Redis: pass one to each engine,
    ``cs.Engine(coordinator=cs.RedisCoordinator(redis.Redis()))``, then
    ``engine.limit("task:db", 5, shared=True)`` holds 5 across every engine of the
    fleet, and ``engine.rate_limit("tag:api", "100/s", shared=True)`` 100/s across it.

    ``client`` is a redis-py client you built (``redis.Redis(...)``, or
    ``redis.asyncio.Redis(...)``: that one is then driven on the coordinator's own
    event loop, so give it a client of its own). Everything on the Redis side is one
    Lua script, with Redis's clock (engines need no clock sync), under keys
    ``<prefix>:<type>:{<scope>}:*``. ``lease``: seconds a concurrency permit lives
    unless renewed (engines renew theirs every lease/3): a crashed engine's permits
    come back after it. ``on_outage``: what a shared control does while Redis cannot
    be reached, unless the control says (``on_outage=``): ``"hold"`` (no new starts)
    or ``"local"`` (this engine's share: the limit or rate over the engines last seen
    holding it, at least 1). ``poll``: seconds between asks of an engine whose units
    wait for a permit (a rate asks when its next token is due). Give the client a
    ``socket_timeout`` (a few seconds, below the lease): a Redis that hangs is then an
    outage, not a pump that waits for ever."""

    def __init__(self, client: Any, *, prefix: str = "cascade", lease: float = 10.0,
                 on_outage: str = "hold", poll: float = 0.02) -> None:
        if not callable(getattr(client, "evalsha", None)) or not callable(
                getattr(client, "script_load", None)):
            raise TypeError(f"RedisCoordinator(client): need a redis-py client "
                            f"(redis.Redis(...) or redis.asyncio.Redis(...)), got "
                            f"{type(client).__name__}")
        if not isinstance(prefix, str) or not prefix or not prefix.isprintable() or " " in prefix:
            raise ValueError(f"prefix={prefix!r}: need a non-empty key prefix without spaces "
                             "('cascade', 'team-a:cascade')")
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0.5 <= lease <= 3600:
            raise ValueError(f"lease={lease!r}: need the seconds a permit lives unless renewed "
                             "(0.5 to 3600)")
        if on_outage not in _OUTAGES:
            raise ValueError(f"on_outage={on_outage!r}: use 'hold' (no new starts while Redis "
                             "is unreachable) or 'local' (this engine's share)")
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0.001 <= poll <= 5:
            raise ValueError(f"poll={poll!r}: need seconds between asks (0.001 to 5)")
        self.client, self.prefix = client, prefix
        self.lease, self.on_outage, self.poll = float(lease), on_outage, float(poll)
        self._async = inspect.iscoroutinefunction(client.evalsha) or type(
            client).__module__.startswith("redis.asyncio")
        import hashlib  # (stdlib; only a coordinator needs it)
        self._sha = hashlib.sha1(_FLEET_LUA.encode()).hexdigest()
        self._lock = threading.Lock()
        self._loop = None

    def exchange(self, kind, scope, engine, held, want, cap, burst, leave=False,
                 known=False, lead=0.0):
        """One round trip for one shared control (see _FLEET_LUA): returns (granted,
        seconds until worth asking again, fleet usage, engines holding it, the tokens a
        rate's bucket had before the grant (the j-th token granted is due (j - that) /
        rate seconds after the coordinator's time) and that time). ``known``: ``engine`` has been registered by
        an earlier round trip; ``lead``: a rate may hand out tokens due up to that many
        seconds ahead."""
        base = f"{self.prefix}:{'concurrency' if kind == 'c' else 'rate_limit'}:{{{scope}}}"
        keys = [f"{base}:{k}" for k in ("bucket", "holds", "live", "tickets", "wants", "seq",
                                            "quiet")]
        args = [kind, engine, repr(held), str(want), repr(cap), repr(burst), repr(self.lease),
                "1" if leave else "0", "1" if known else "0", repr(float(lead))]
        if self._async:
            with self._lock:
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                r = self._loop.run_until_complete(self._acall(keys, args))
        else:
            r = self._call(keys, args)
        return (int(r[0]), int(r[1]) / 1e6, int(r[2]), int(r[3]),
                *((int(r[4]) / 1e6, int(r[5]) / 1e6) if len(r) > 5 else ()))

    def _call(self, keys, args):
        try:
            return self.client.evalsha(self._sha, len(keys), *keys, *args)
        except Exception as exc:
            if "NOSCRIPT" not in str(exc) and type(exc).__name__ != "NoScriptError":
                raise
        self._sha = self.client.script_load(_FLEET_LUA)
        return self.client.evalsha(self._sha, len(keys), *keys, *args)

    async def _acall(self, keys, args):
        try:
            return await self.client.evalsha(self._sha, len(keys), *keys, *args)
        except Exception as exc:
            if "NOSCRIPT" not in str(exc) and type(exc).__name__ != "NoScriptError":
                raise
        self._sha = await self.client.script_load(_FLEET_LUA)
        return await self.client.evalsha(self._sha, len(keys), *keys, *args)

    def __repr__(self):
        return f"<RedisCoordinator prefix={self.prefix!r} lease={self.lease:g}s>"


class _Fleet:
    """An engine's pump for its shared controls, on a thread of its own (a sync client's
    calls never run on an event loop's thread): for each shared state, one round trip
    to the coordinator when units wait on it (asking for as many grants as wait), when
    what it holds changed (permits given back), and every lease/3 (renewal). A reply
    adds credit and wakes the state under the control plane's lock, as a refill does.
    A failed round trip puts the state ``down`` (its on_outage applies) until one
    succeeds again: one warning per outage, and a CoordinatorOutage / CoordinatorRecovered
    event per control."""

    def __init__(self, coordinator, cp, me, bus):
        self.coordinator, self.cp, self.me, self.bus = coordinator, cp, me, bus
        self.lease = float(getattr(coordinator, "lease", 10.0))
        self.on_outage = getattr(coordinator, "on_outage", "hold")
        self.poll = float(getattr(coordinator, "poll", 0.02))
        self.stale = min(1.0, self.lease / 3)  # unused credit goes back after this
        # a rate's tokens may be handed out this many seconds before they are due (see
        # _FLEET_LUA): a pump that asks a little late then loses none of the fleet's
        self.lead = 0.1
        # the coordinator's clock less ours (monotonic), as far as known for sure: the
        # most of its time less ours at a reply's arrival (see _clock)
        self.offset, self.offset_at = None, 0.0
        self.granted = False  # a grant came in this round (the next one comes at once)
        # state -> (its control's (scope, type), its name at the coordinator), until it
        # has left the fleet
        self.states = {}
        self.serial = itertools.count(1)
        self.event = threading.Event()
        self.thread = None
        self.closed = False
        self.down = False  # an outage was warned about (one warning per outage)

    def attach(self, key, st, name=None):  # control plane lock held
        self.states[st] = (key, name or key[0])
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="cascade-coordinator",
                                           daemon=True)
            self.thread.start()
        self.event.set()

    def poke(self):
        if not self.event.is_set():
            self.event.set()

    def close(self):
        self.closed = True
        self.event.set()

    def _run(self):
        timeout = 0.0
        while True:
            self.event.wait(timeout)
            self.event.clear()
            if self.closed:
                # Each state leaves the fleet once nothing of it is held here: a sync
                # body abandoned after stop_grace keeps its permits (renewed) until it
                # returns, as it keeps its local slots (review: leaving at once let
                # another engine start one more under the cap while it ran).
                with self.cp.lock:
                    empty = []
                    for st in list(self.states):
                        st.active = False
                        st.drop_credit()  # (unused grants: not kept)
                        if not st.owned():
                            empty.append((st, self.states.pop(st)))
                for st, (key, name) in empty:
                    try:  # (best effort: a lease ends by itself)
                        self.coordinator.exchange(st.kind, name, st.member, 0, 0, 0, 0,
                                                  True)
                    except Exception:
                        pass
                if not self.states:
                    return
            now = time.monotonic()
            due = now + self.lease / 3
            with self.cp.lock:
                demands = self._demands()
            self.granted = False
            for st, (key, name) in list(self.states.items()):
                try:
                    due = min(due, self._pump(st, key, name, demands.get(st, 0)))
                except Exception:  # never the pump itself
                    _log.exception("coordinator pump failed for %s on %s", key[1], key[0])
                    due = min(due, time.monotonic() + 1.0)
            # (a grant may let units ask for their next shared control: at once)
            timeout = 0.0 if self.granted else max(0.0, due - time.monotonic())

    def _demands(self):  # lock held: {shared state: the grants its waiters lack}
        """What the units held back on shared controls alone lack of each (units held
        back locally too ask once that passes). A unit that needs several shared
        controls asks for them one at a time, in one order every engine follows (by name
        at the coordinator), for the first it lacks: it holds credit of earlier ones only
        while it waits for a later one, so no two engines wait for each other's credit.
        Credit counts once, unit by unit: the oldest units are covered by it first."""
        states, parked = self.states, self.cp._parked
        seen, queues = set(), []
        for st in states:
            parking = parked.get(st)
            if parking is None:
                continue
            for e in parking.heap:
                q = e[2]
                if (q is not None and q not in seen and q.waiters
                        and all(x[3].state.shared for x in q.entries)):
                    seen.add(q)
                    queues.append(q)
        queues.sort(key=lambda q: q.waiters[0].seq)
        avail, lack = {}, {}
        for q in queues:
            needs = sorted(((states[s][1], s.kind), s, n) for s, n in q.key.needs
                           if s.shared and s in states and not s.down)
            m = len(q.waiters)  # its units that have the credit of the states so far
            for _, s, n in needs:
                have = avail.get(s, s.credit)
                covered = min(m, int(have // n)) if n else m
                avail[s] = have - covered * n
                if covered < m:
                    lack[s] = lack.get(s, 0) + (m - covered) * n
                m = covered
                if not m:
                    break
        return lack

    def _pump(self, st, key, name, lack):
        """One round trip for ``st`` if one is due (``lack``: what its waiters lack
        beyond its credit); returns when one may be due next."""
        cp, now = self.cp, time.monotonic()
        with cp.lock:
            if st.owner is not None and st.owner.live.get(st.value) is not st:
                st.active = False  # a per-key part the sweep forgot: it leaves the fleet
            want = st.want(lack + st.credit) if st.active and not st.down and lack else 0
            if st.credit and (not st.active or now >= st.granted_at + self.stale):
                # Unused grants go back, once they have sat unused for a while. Not at
                # once when nobody waits on this state: a unit that needs two shared
                # controls waits on one while it holds the other's credit, and giving
                # that back each time made the two take turns for ever (a livelock the
                # property test found). Not kept for ever either: held while waiting,
                # they could hold back another engine that waits for the other way round.
                if st.kind == "r":
                    st.returned += st.credit
                st.drop_credit()
            held = st.owned()
            give = st.returned if st.kind == "r" else held
            leave = not st.active and held == 0 and not st.returned
            # (a ticket that asks for more than is wanted now is lowered at once: it
            # holds back the tickets behind it)
            if not (leave or (want and now >= st.retry) or want < st.asked
                    or (st.kind == "c" and held != st.synced) or st.returned
                    or now >= st.renew_at):
                return min(st.renew_at, st.retry if want else math.inf,
                           st.granted_at + self.stale if st.credit else math.inf)
            cap = st.total if st.kind == "c" else st.rate
            burst = 0 if st.kind == "c" else st.burst
        sent = time.monotonic()
        try:
            grant, retry, used, engines, *due = self.coordinator.exchange(
                st.kind, name, st.member, give, want, cap, burst, leave,
                known=st.used is not None, lead=self.lead if st.kind == "r" else 0.0)
        except Exception as exc:
            return self._failed(st, key, exc, now)
        arrived = time.monotonic()
        if leave:
            with cp.lock:
                if not st.active and not st.owned():
                    self.states.pop(st, None)
            return math.inf
        granted = None
        with cp.lock:
            recovered, st.down, st.error = st.down, False, None
            if st.kind == "r":
                st.returned -= give
            st.synced, st.asked = held + grant, want - grant
            st.renew_at = now + self.lease / 3
            st.used, st.engines = used, max(1, engines)
            if grant:
                st.add_credit(grant, *self._clock(due, sent, arrived))
                st.granted_at = now
                self.granted = True
            st.retry = 0.0 if grant >= want else now + (retry if st.kind == "r" else self.poll)
            if grant or recovered:
                cp._wake(st)
                granted = cp._admit() if cp._ready else None
        cp._dispatch(granted)
        if recovered:
            if self.down:
                self.down = False
                _log.warning("coordinator reachable again: shared controls are fleet-wide "
                             "again")
            self._event(CoordinatorRecovered, key, None)
        return min(st.renew_at, st.retry or math.inf,
                   st.granted_at + self.stale if st.credit else math.inf)

    def _clock(self, due, sent, arrived):
        """(tokens before the grant, our monotonic time the coordinator's time stood at)
        for add_credit, from a reply's ``due`` (before, the coordinator's time) sent and
        arrived at those times of ours. Its time less ours is at least its time less the
        arrival, so the most of that over the replies is never above the truth and comes
        within the fastest round trip of it: a token is then never due early here, and a
        pump descheduled before it reads the clock (a late arrival) moves nothing. It
        drifts down 100 µs a second (clocks drift), and a reply that shows it too high
        (a clock stepped back) sets it anew."""
        if not due:  # (a coordinator that does not say: every token is due at once)
            return math.inf, arrived
        before, then = due
        if self.offset is None or then - sent < self.offset:
            self.offset = then - arrived
        else:
            self.offset = max(then - arrived,
                              self.offset - 1e-4 * (arrived - self.offset_at))
        self.offset_at = arrived
        return before, then - self.offset

    def _failed(self, st, key, exc, now):
        reason = _error_text(f"{type(exc).__name__}: {exc}", "error")
        granted = None
        with self.cp.lock:
            first, st.down, st.error = not st.down, True, reason
            if st.kind == "c":
                st.drop_credit()  # permits it cannot renew: not to be used any more
            st.retry = st.renew_at = now + min(1.0, self.lease / 3)
            if first and st.outage == "local":
                self.cp._wake(st)
                granted = self.cp._admit() if self.cp._ready else None
        self.cp._dispatch(granted)
        if first and not self.closed:
            if not self.down:
                self.down = True
                _log.warning("coordinator unreachable (%s): shared controls %s until it is "
                             "back", reason, "fall back as each one's on_outage says")
            self._event(CoordinatorOutage, key, reason)
        return st.retry

    def _event(self, cls, key, reason):
        c = self.cp.constraints.get(key)
        if c is None:
            return
        self.bus.emit(cls("", c, reason) if cls is CoordinatorOutage else cls("", c))

    def __repr__(self):
        return f"<_Fleet {len(self.states)} shared controls {self.coordinator!r}>"


class _History:
    """The last ``size`` finished runs of an engine, newest first: what ``status()`` and
    the views (``cascade top``, ``cascade serve``) show of them. With a store it is also
    kept there, under ``cascade/history/<org>/<project>``, and read back by the next
    engine of that project (a restart keeps it; engines of one project sharing a store
    share it too, the last writer's list winning). A store that fails is warned about
    once and the history stays in memory."""

    def __init__(self, size, store):
        self.runs = collections.deque(maxlen=size)
        self.store = store if size else None
        self.key = None       # set by the engine once it knows its org and project
        self.loaded = self.store is None
        self.warned = False
        self.lock = threading.Lock()
        self.seq = 0          # runs added (a put checks none was added meanwhile)
        t = getattr(store, "timeout", 5.0)  # seconds a store call is waited for
        self.timeout = float(t) if _is_number(t) and t > 0 else 5.0
        self.threads = None   # a daemon thread for a sync store's calls (see _call)

    def entries(self):
        """The finished runs, newest first (a list of dicts)."""
        if not self.loaded:
            got = self._call("get", self.key)
            try:
                if isinstance(got, concurrent.futures.Future):
                    got = got.result(self.timeout)
            except Exception as exc:  # (a TimeoutError too)
                self._failed(exc)
                return list(self.runs)
            if not inspect.isawaitable(got):
                self._loaded(got)
            elif hasattr(got, "close"):  # an async store: read at the next run
                got.close()
        return list(self.runs)

    def _loaded(self, got):
        with self.lock:
            if not self.loaded:
                self.loaded = True
                if isinstance(got, list):  # newest first, after any of this engine's
                    kept = list(self.runs) + [e for e in got if isinstance(e, dict)]
                    self.runs.clear()
                    self.runs.extend(kept[:self.runs.maxlen])

    def _call(self, verb, *args):
        """The store's ``verb``: an inline store's (SqliteStore) called here, an async
        one's awaitable returned, a sync one's run on daemon threads (a concurrent
        future): each is waited for at most the store's ``timeout`` (as a run's own
        store calls are, see _Stored), so a hung store holds no run's end or status()."""
        store = self.store
        try:
            fn = getattr(store, verb)
            if getattr(type(store), "_inline", False) or inspect.iscoroutinefunction(fn):
                return fn(*args)
            with self.lock:
                if self.threads is None:
                    self.threads = _Workers(4, prefix="cascade-history")
            return self.threads.submit(fn, *args)
        except Exception as exc:
            self._failed(exc)
            return MISS

    async def _answer(self, got):
        """What a store call of _call gave, awaited for at most the store's timeout."""
        if isinstance(got, concurrent.futures.Future):
            got = await asyncio.wait_for(asyncio.wrap_future(got), self.timeout)
        if inspect.isawaitable(got):
            got = await asyncio.wait_for(got, self.timeout)
        return got

    def _failed(self, exc):
        self.loaded = True
        self.store = None  # (kept in memory from now: a hung store is not waited for again)
        if not self.warned:
            self.warned = True
            _log.warning("the store could not keep the run history (%s: %s); it is kept "
                         "in memory only", type(exc).__name__, exc)

    async def add(self, run, status, duration, error):
        """Record ``run``'s end (on its loop, at its end)."""
        if self.runs.maxlen == 0:
            return
        entry = {"run_id": run.run_id, "status": status, "started_at": run.started_at,
                 "duration": round(duration, 6), "counts": run.totals(),
                 "error": None if error is None else _printable(
                     f"{type(error).__name__}: {error}")[:300]}
        if self.store is not None and not self.loaded:
            try:
                self._loaded(await self._answer(self._call("get", self.key)))
            except Exception as exc:  # (this run is kept in memory all the same)
                self._failed(exc)
        with self.lock:
            self.runs.appendleft(entry)
            self.seq += 1
            mine, kept = self.seq, list(self.runs)
        if self.store is None:
            return
        t = self.timeout
        try:
            for _ in range(3):  # runs ending at once on several loops: a slower put of
                await self._answer(self._call("put", self.key, kept))  # (an older list
                # is written again)
                with self.lock:  # a run ended since: its put may have been done before
                    if self.seq == mine:  # this one, which wrote an older list over it
                        break
                    mine, kept = self.seq, list(self.runs)
            flush = getattr(self.store, "flush", None)  # (SqliteStore: committed when the
            if callable(flush):                           # run returns, as its checkpoints)
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                    None, flush, t), t + 1)
        except Exception as exc:  # (asyncio.TimeoutError too)
            self._failed(exc)


class Engine:
    """Runs graphs and holds the control plane that steers them.

    Every control method is thread-safe and may be called before a run, during it, from
    inside a task or from any other thread; the change applies to every run of this
    engine from the moment the call returns::

        engine = cs.Engine(system_resources={"gpu": 1})
        engine.pause("task:api_call", ttl=30)      # lifts itself after 30 s
        engine.limit("tag:io", 10)                 # at most 10 io tasks at once
        engine.rate_limit("task:fetch", "5/s")     # at most 5 starts a second

    Sync task bodies run in a thread pool of ``max_workers`` threads (sized for blocking
    I/O; daemon threads, so they never keep the process alive at exit), or in
    ``executor`` (any concurrent.futures.Executor: a process pool, a Dask ``Client`` or
    its ``get_executor()``); async bodies run on the event loop. An executor that runs
    bodies elsewhere (anything but a thread pool) gets them through a window: at most
    ``window`` handed over and unfinished at once (default: its slots, a process pool's
    workers and one more, or a Dask cluster's threads and one more per worker), so
    pauses, limits, failures and cancels act on the rest; a run first checks that each
    of its sync tasks can be sent (see _Remote).

    When a run stops (a task failed, ``cancel()``, ``close()``) it waits at most
    ``stop_grace`` seconds (``None``: for ever) for the bodies still running. Those that
    have not ended by then are abandoned (a sync body cannot be interrupted): the run
    logs a warning naming each, counts it failed and ends; the body runs on until its
    function returns and holds its concurrency slots until then, so no limit is ever
    exceeded. Cancelling the run again while it waits ends the wait at once.

    With a ``connector``, every run follows the controls on its broker and publishes
    telemetry there, as ``org``/``project`` (default: $CASCADE_ORG_ID and
    $CASCADE_PROJECT_ID, else "default"). ``telemetry`` says how much: ``"all"`` (every
    task's every state change), ``"counts"`` (the items of a map as counts per state,
    a MapCountsEvent at most once a message and a last one before the run's end; other
    tasks as with "all"), ``"runs"`` (each run's start and end, with its outcome) or
    ``"off"``. ``telemetry_errors="type"`` sends a failure's exception type without
    its message (which can hold secrets).

    With a ``connector``, the engine also keeps a retained presence record on the broker
    (``presence_topic``), refreshed at least every ``presence`` seconds (None: none), so
    ``Controller.engines()`` and ``cascade status`` show it and what it enforces.

    With a ``store`` (``cs.SqliteStore(path)``, ``cs.RedisStore(client)`` or any object
    with ``get(key)`` -> value or ``cs.MISS`` and ``put(key, value, ttl=None)``, sync or
    async, and optionally ``get_many(keys)``/``put_many([(key, value, ttl)])``), a run
    given a ``run_id`` is checkpointed (a re-run with that id skips what finished), and
    calls ``with_cache`` reuse stored values; see README "Durable runs and caching".

    With a ``coordinator`` (``cs.RedisCoordinator(redis.Redis(...))``), limits and rate
    limits set with ``shared=True`` hold across every engine that shares it (see the
    README's "Scaling out").

    ``history``: how many finished runs the engine keeps for ``status()`` and the live
    views (kept in its store too, when it has one, so they survive a restart)."""

    def __init__(self, *, system_resources: Optional[dict] = None,
                 resources: Iterable[Resource] = (), connector: Any = None,
                 max_workers: int = 64, executor: Optional[concurrent.futures.Executor] = None,
                 window: Optional[int] = None, stop_grace: Optional[float] = 10.0,
                 org: Optional[str] = None, project: Optional[str] = None,
                 telemetry: str = "all", telemetry_errors: str = "message",
                 presence: Optional[float] = 5.0, store: Any = None,
                 coordinator: Any = None, history: int = 20) -> None:
        caps = dict(system_resources or {})
        self._store = _check_store(store)
        if isinstance(history, bool) or not isinstance(history, int) or not 0 <= history <= 10000:
            raise ValueError(f"history={history!r}: need how many finished runs the engine "
                             "keeps for status and the views (0 to 10000)")
        if coordinator is not None and not callable(getattr(coordinator, "exchange", None)):
            raise TypeError(f"coordinator={coordinator!r:.80}: need a coordinator of shared "
                            "limits, cs.RedisCoordinator(redis.Redis(...))")
        if telemetry not in _TELEMETRY_MODES:
            raise ValueError(f"telemetry={telemetry!r}: use 'all' (every task's every state), "
                             "'counts' (a map's items as counts per state), 'runs' (each "
                             "run's start and end only) or 'off' (none)")
        if presence is not None and (isinstance(presence, bool) or not isinstance(
                presence, (int, float)) or not 0.1 <= presence <= 3600):
            raise ValueError(f"presence={presence!r}: need the seconds between presence "
                             "heartbeats (0.1 to 3600), or None to publish no presence record")
        if telemetry_errors not in ("message", "type"):
            raise ValueError(f"telemetry_errors={telemetry_errors!r}: use 'message' (the "
                             "exception's type and message, capped) or 'type' (its type only)")
        self.telemetry, self.telemetry_errors = telemetry, telemetry_errors
        for k, v in caps.items():
            _check_name(k, "system resource name")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"system_resources[{k!r}] must be an int >= 0, got {v!r}")
        if executor is not None and not callable(getattr(executor, "submit", None)):
            raise TypeError("executor must be a concurrent.futures.Executor (with submit())")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers={max_workers!r}: need an int >= 1")
        remote = _remote_for(executor)
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(f"window={window!r}: need an int >= 1 (how many sync bodies "
                                 "may be handed to the executor at once), or None for its "
                                 "default (its slots)")
            if remote is None:
                raise ValueError(f"window={window}: a thread pool has no window (its bodies "
                                 "pass the start gate in their threads); it applies to a "
                                 "process pool or a Dask cluster passed as executor=")
        if stop_grace is not None and (isinstance(stop_grace, bool) or not isinstance(
                stop_grace, (int, float)) or not stop_grace >= 0):
            raise ValueError(f"stop_grace={stop_grace!r}: need seconds >= 0, or None to "
                             "wait for running bodies for ever")
        self.org = _check_name(org or os.environ.get("CASCADE_ORG_ID") or "default", "org")
        self.project = _check_name(project or os.environ.get("CASCADE_PROJECT_ID")
                                   or "default", "project")
        self._bus = _Bus()
        self._cp = _ControlPlane(caps, self.project, self._constraint_changed)
        self._resources = {}
        for r in resources:
            self.register(r)
        self._max_workers = max_workers
        self._executor = executor
        # A remote executor's window (see _Remote): fixed by window=, else its slots
        # (a Dask cluster's: read when each run starts).
        self._remote = remote
        self._window_size = window
        self._window = None if remote is None else _Window(
            window or (1 if remote.sized else remote.slots()), remote.name)
        self._stop_grace = stop_grace
        self._pool = None
        self._pool_lock = threading.Lock()
        self._runs = {}
        self._started = {}  # run id -> RunHandle of engine.start, until the run ends
        self._cancel_lock = threading.Lock()
        self._early = {}    # run id -> scopes cancelled before its graph was built
        self._closed = False
        self._servers = []  # web views (serve), closed with the engine
        self._history = _History(history, self._store)
        self._history.key = f"cascade/history/{self.org}/{self.project}"
        # this engine's name on the broker: host-pid and a random part (see _Presence)
        self.id = f"{_source()}-{os.urandom(3).hex()}"
        self.coordinator = coordinator
        if coordinator is not None:
            self._cp.fleet = _Fleet(coordinator, self._cp, self.id, self._bus)
        self._link = _Link(self, connector, presence) if connector is not None else None

    # -- control plane ------------------------------------------------------
    def pause(self, scope: str = "global", *, ttl: Optional[float] = None) -> Constraint:
        """Stop tasks matched by ``scope`` from starting until ``resume`` (or the ttl).
        Tasks already running finish; unmatched tasks keep running."""
        c = Constraint.make(scope, "pause", ttl=ttl)
        self._cp.apply(c)
        return c

    def adapt(self, scope: str, *, min: int = 1, max: int, on: Any = (),
              latency: Optional[float] = None, factor: float = 0.5,
              limit: Optional[int] = None, ttl: Optional[float] = None) -> Constraint:
        """An adaptive concurrency limit on ``scope`` that follows the downstream
        service (AIMD): it starts at ``limit`` (default ``max``); each error of a type in
        ``on`` (classes or their names; subclasses count), or body slower than
        ``latency`` seconds, multiplies it by ``factor`` (never below ``min``); as many
        clean bodies in a row as the limit adds one (never above ``max``). Each change
        is a ``ConstraintApplied`` event whose params carry the new ``limit``, and shows
        in ``status()``. It holds beside an ordinary ``limit`` on the same tasks."""
        c = Constraint.make(scope, "adaptive", _adapt_params(min, max, on, latency, factor,
                                                             limit), ttl=ttl)
        self._cp.apply(c)
        return c

    def _backoff(self, scope, seconds):
        """A task raised cs.Backoff: pause ``scope`` for ``seconds`` (this engine's own
        layer), unless a pause of that scope already lasts as long or longer."""
        now = time.time()
        for c in self._cp.active():
            if (c.scope, c.type, c.origin) == (scope, "pause", "local") and (
                    c.expires_at is None or c.expires_at >= now + seconds):
                return c
        c = Constraint.make(scope, "pause", ttl=seconds)
        self._cp.apply(c)
        return c

    def resume(self, scope: str = "global", *,
               ramp: Union[str, float, None] = None) -> Optional[Constraint]:
        """Lift the pause of exactly this scope (other scopes' pauses and any limits
        stay). Returns the removed pause, or None.

        With ``ramp`` (a rate, as rate_limit's: ``"10/s"``), the backlog does not start
        all at once: a ``ramp`` control on the scope (a rate limit of that rate, burst
        1) is put in force first, then the pause goes, so no instant has neither. The
        ramp lifts itself (a ConstraintRemoved event) once no task it matches waits any
        more; new work that comes later is not slowed. It is a type of its own: a
        rate_limit on the same scope holds beside it and stays. ``clear(scope, "ramp")``
        lifts it early; status() shows it, with the backlog still waiting."""
        scope = _check_scope(scope)
        if ramp is not None:
            self._cp.apply(Constraint.make(scope, "ramp", {"rate": ramp}))
        removed = self._cp.remove(scope, "pause")
        return removed[0] if removed else None

    def drain(self, scope: str = "global", *, ttl: Optional[float] = None) -> Constraint:
        """For maintenance: runs already started carry on to their end; a run started
        later holds at its first task matched by ``scope`` (as if paused) until
        ``undrain`` (or the ttl). Unmatched tasks run as usual."""
        c = Constraint.make(scope, "drain", ttl=ttl)
        self._cp.apply(c)
        return c

    def undrain(self, scope: str = "global") -> Optional[Constraint]:
        """Lift the drain of exactly this scope: the runs it held go on. Returns the
        removed constraint, or None."""
        removed = self._cp.remove(_check_scope(scope), "drain")
        return removed[0] if removed else None

    def cancel(self, scope: str) -> int:
        """Cancel, once, every task matched by ``scope`` that has not finished, in every
        active run of this engine: each ends skipped with reason ``cancelled: <scope>``
        (a ``TaskSkipped`` event), and its dependents are skipped as for any skip. Waiting
        tasks never start; a running async body is cancelled; a running sync body runs to
        its end and its result is dropped (on a process pool or Dask, a body not begun yet
        is cancelled); a pending retry does not happen; calls whose inputs are not done
        yet are skipped when they are. Nothing stays in force: tasks of runs started
        later, and of graphs returned later, run as usual. Returns how many tasks (a
        map's items each) were cancelled. From any thread; from a run's own loop it
        acts at once, from elsewhere it waits for each run's loop to act. A run that
        ``start()`` listed but whose loop has not begun it yet is cancelled as it begins
        (its tasks are not counted here)."""
        scope = _check_scope(scope)
        total, waits = 0, []
        me = threading.get_ident()
        with self._cancel_lock:  # (against _prepared)
            runs = [r for r in list(self._runs.values()) if r.prepared]
            for run_id in {*self._started, *self._runs}:
                r = self._runs.get(run_id)
                if r is None or not r.prepared:  # not begun: cancelled when it is
                    self._early.setdefault(run_id, []).append(scope)
        for run in runs:
            if run.thread == me:
                total += run.cancel(scope)
                continue
            f = concurrent.futures.Future()

            def act(run=run, f=f):
                try:
                    f.set_result(run.cancel(scope))
                except BaseException as exc:
                    f.set_exception(exc)
            try:
                run.loop.call_soon_threadsafe(act)
            except RuntimeError:  # its loop has closed: nothing left to cancel
                continue
            waits.append(f)
        for f in waits:
            total += f.result()
        return total

    def _shared_ok(self, shared, call):
        if shared and self.coordinator is None:
            raise ConstraintError(f"{call}(shared=True) needs an engine with a coordinator: "
                                  "cs.Engine(coordinator=cs.RedisCoordinator(redis.Redis(...)))"
                                  "; without one, leave shared out (a limit of this engine)")

    def limit(self, scope: str, n: int, *, per: Optional[str] = None,
              overrides: Optional[dict] = None, fair: Optional[str] = None,
              weights: Optional[dict] = None, ttl: Optional[float] = None,
              shared: bool = False, on_outage: Optional[str] = None) -> Constraint:
        """At most ``n`` tasks matched by ``scope`` run at once. Raising it starts
        waiters at once; lowering it never stops running tasks; 0 holds every start.

        ``per="customer"``: at most ``n`` for each value of that key (tasks declare keys:
        ``@cs.task(keys=...)``), ``overrides={"acme": 10}`` giving some values their
        own; it is a control of its own type (keyed_concurrency), so it holds beside an
        ordinary limit of the same scope. Tasks without the key are not limited by it.

        ``fair="customer"``: the limit admits its waiters round robin across that key's
        values (``weights={"acme": 3}``: three grants per round), so one customer's
        backlog does not hold back another's next task.

        ``shared=True``: at most ``n`` across every engine of the fleet (the engine needs
        a ``coordinator``); ``on_outage`` ("hold" or "local") overrides the
        coordinator's for this limit."""
        c = _limit_control(scope, n, per, overrides, fair, weights, ttl, shared, on_outage)
        self._shared_ok(shared, "limit")
        self._cp.apply(c)
        return c

    def rate_limit(self, scope: str, rate: Union[str, float, list], *,
                   burst: Union[int, list, None] = None, weighted: bool = True,
                   per: Optional[str] = None, overrides: Optional[dict] = None,
                   ttl: Optional[float] = None, shared: bool = False,
                   on_outage: Optional[str] = None) -> Constraint:
        """At most ``burst + rate * elapsed`` starts of tasks matched by ``scope``;
        ``rate`` is "N/s", "N/m", "N/h", "N/d" or a number per second; burst defaults
        to 1. Several windows, each bound holding: ``rate=["60/m", "10000/d"]`` with
        ``burst`` a list (one per window), by default 1 for the first and each further
        window's count (10000): a quota of 10,000 a day, at 1 a second at most. A start
        takes its task's cost in tokens (``@cs.task(cost=...)``, 1 by default), or 1
        whatever the cost with ``weighted=False`` (requests, beside a tokens limit).

        ``per="customer"``: this rate for each value of that key, ``overrides=
        {"acme": "100/s"}`` giving some values their own (type keyed_rate_limit).

        ``shared=True``: one bucket for every engine of the fleet (one rate; the engine
        needs a ``coordinator``); ``on_outage`` as for ``limit``."""
        c = _rate_control(scope, rate, burst, weighted, per, overrides, ttl, shared,
                          on_outage)
        self._shared_ok(shared, "rate_limit")
        self._cp.apply(c)
        return c

    def clear(self, scope: str, type: Optional[str] = None) -> list:
        """Remove the constraint of ``type`` on ``scope``, or all of them when type is None."""
        return self._cp.remove(_check_scope(scope), _check_type(type, "clear"))

    @property
    def constraints(self) -> list:
        """The constraints in force, each with its ``origin``: ``"local"`` (this engine's
        verbs) or ``"broker"`` (a retained control message, which is in force over the
        engine's own control of the same scope and type while it is present)."""
        return self._cp.active()

    def _constraint_changed(self, applied, c):
        self._bus.emit((ConstraintApplied if applied else ConstraintRemoved)("", c))
        if self._link is not None and self._link.presence is not None:
            self._link.presence.changed()

    @property
    def presence_topic(self) -> Optional[str]:
        """The retained topic of this engine's presence record (None without a connector
        or with ``presence=None``): set it as your MQTT client's last will, an empty
        retained message, and a crashed engine is removed at once."""
        p = self._link.presence if self._link is not None else None
        return None if p is None else p.topic

    def status(self) -> dict:
        """A snapshot: per-task state counts, what every blocked task waits on (the
        first 100 in ``blocked``; ``waiting``: how many wait per task and reason), and
        per-scope usage against limits. Prints as a table; a notebook shows it as HTML
        tables (see _html)."""
        runs = list(self._runs.values())
        # runs started but not yet begun by their loop: listed, with no tasks yet
        waiting = [k for k, h in list(self._started.items())
                   if not h.done() and k not in self._runs]
        tasks = {}
        for r in runs:
            for name, counts in r.counts().items():
                c = tasks.setdefault(name, collections.Counter())
                c.update(counts)
        scopes, caps, blocked = self._cp.snapshot(
            [p for r in runs for p in r.scoped_tallies()])
        window = self._window
        return _Status(runs=[r.run_id for r in runs] + waiting,
                       tasks={k: dict(v) for k, v in tasks.items()},
                       blocked=blocked, waiting=self._cp.waiting(), scopes=scopes,
                       capacities=caps, window=None if window is None else window.usage(None),
                       history=self._history.entries())

    def serve(self, port: int = 0, host: str = "127.0.0.1", token: Optional[str] = None):
        """Serve a live web view of this engine: its runs with progress, rate and ETA,
        per-task counts, what blocked tasks wait on, its controls with time left and
        usage, its finished runs, and buttons that pause, resume, limit or clear a task
        on this engine. Returns at once; the server runs on daemon threads until
        ``.close()`` or ``engine.close()``. ``port=0`` picks a free port. Open ``.url``:
        it carries ``token`` (default: a random one, ``.token``) in its fragment; every
        request for data or a control needs it. It listens on 127.0.0.1 unless ``host``
        says otherwise (warned: see the README's web view). Engines on a broker are
        seen together with ``cascade serve``."""
        if self._closed:
            raise CascadeError("engine.serve(): this engine is closed")
        web = _WebView(_View(engines=[self]),
                       lambda verb, scope, n: asyncio.run(_steer(self, verb, scope, n)),
                       host=host, port=port, token=token, where="on this engine",
                       where_long=f"engine {self.id} ({self.org}/{self.project})",
                       refresh=0.5)
        self._servers.append(web)
        return web

    # -- events, resources --------------------------------------------------
    def subscribe(self, event_type: type, callback: Callable[[Any], Any]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of ``event_type`` (``cs.Event``: all).
        Returns a function that unsubscribes."""
        return self._bus.subscribe(event_type, callback)

    def register(self, resource: Resource) -> Resource:
        """Make a ``@cs.resource`` available to every run of this engine."""
        if not isinstance(resource, Resource):
            raise TypeError(f"register() takes a @cs.resource generator, got {resource!r}")
        self._resources[resource.name] = resource
        return resource

    # -- running --------------------------------------------------------------
    async def run(self, target: Any, params: Optional[dict] = None, *,
                  run_id: Optional[str] = None, store: Any = None) -> Any:
        """Run ``target`` (a lazy result, or a list/tuple/dict of them) and return its
        value. On the first task failure the run fails fast and the task's exception is
        raised unchanged. Logs nothing above DEBUG; subscribe to events instead.
        ``run_id`` names the run (``run:<run_id>`` scopes, telemetry topics); by default
        a new one. It must be a valid topic level, and not the id of an active run.
        With a store (``store``, else the engine's), a run given a ``run_id`` is
        checkpointed: each task execution that succeeds is recorded, and a later run
        with the same id and graph takes those values instead of running them again."""
        durable = run_id is not None
        run_id = self._check_run_id(run_id)
        return await self._run(target, params, run_id, store, durable)

    def _check_run_id(self, run_id):
        if run_id is None:
            return _new_run_id()
        # (regression: a '/' in it broke the run's telemetry topic)
        _check_name(run_id, "run_id")
        if run_id in self._runs or run_id in self._started:
            raise ValueError(f"run_id {run_id!r} is the id of a run still active on this "
                             "engine; give each concurrent run its own id")
        return run_id

    async def _run(self, target, params, run_id, store, durable, handle=None):
        store = _check_store(store) or self._store
        run = _Run(self, _as_target(target), params, run_id, store, durable and store is not None)
        if handle is not None:
            run.handle = handle
            handle._run = run
        return await run.execute()

    def start(self, target: Any, params: Optional[dict] = None, *,
              run_id: Optional[str] = None, store: Any = None) -> RunHandle:
        """Start a run in the background and return its ``RunHandle`` at once.

        Where an event loop is running in this thread (a notebook), the run lives on it:
        later cells can steer it and ``await handle``. Elsewhere it runs on a new loop in a
        helper thread, and ``handle.result()`` waits for it; the interpreter waits for
        such a run at exit, as for a ThreadPoolExecutor's work (Ctrl-C then cancels it:
        see _wait_at_exit). ``status()`` lists the run from the moment this returns.
        ``run_id`` and ``store``: as for ``run`` (a run id makes a checkpointed run)."""
        target = _as_target(target)
        durable = run_id is not None
        run_id = self._check_run_id(run_id)
        _check_store(store)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RunHandle(run_id, loop or asyncio.new_event_loop())
        handle._target = target
        coro = _contained(self._run(target, params, run_id, store, durable, handle))
        if loop is not None:
            handle._attach(loop.create_task(coro))
            self._listed(handle)
            return handle
        loop = handle._loop

        def begin():
            task = loop.create_task(coro)
            task.add_done_callback(lambda _: loop.stop())
            handle._attach(task)
        loop.call_soon(begin)
        self._listed(handle)
        _wait_at_exit.add(handle)
        threading.Thread(target=_serve, args=(loop,), name=f"cascade-{run_id}",
                         daemon=True).start()
        return handle

    def _listed(self, handle):
        """status() lists a started run at once, before its loop has begun it."""
        self._started[handle.run_id] = handle
        handle._future.add_done_callback(lambda _: (self._started.pop(handle.run_id, None),
                                                    self._early.pop(handle.run_id, None)))

    def _prepared(self, run):
        """``run`` has built its graph: from now engine.cancel acts on it; returns the
        scopes cancelled before (applied by the run at once)."""
        with self._cancel_lock:
            run.prepared = True
            return self._early.pop(run.run_id, ())

    def _threads(self):
        with self._pool_lock:
            if self._pool is None:
                self._pool = _Workers(self._max_workers)
            return self._pool

    def close(self) -> None:
        """Close the engine; returns at once. Active runs stop as on a failure: nothing
        more starts, async bodies are cancelled, running sync bodies get ``stop_grace``
        seconds to finish (then they are abandoned), resources are torn down, and each
        run raises ``CascadeError`` ("closed"). The engine's own thread pool is shut down
        once the last of them has ended (a user's executor is left alone). Its web views
        (``serve``) close. Later runs raise ``CascadeError``."""
        self._closed = True
        for web in self._servers:
            web.close()
        runs = list(self._runs.values())
        for r in runs:
            r.close()
        if not runs:
            self._let_go()

    def _let_go(self):
        """The engine is closed and its last run has ended: its pool and its broker
        subscriptions go."""
        if self._link is not None:
            self._link.forget()
        if self._cp.fleet is not None:
            self._cp.fleet.close()
        self._shutdown_pool()

    def _shutdown_pool(self):
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    def __repr__(self):
        cons = ", ".join(c.describe() for c in self.constraints)
        return (f"<Engine project={self.project} runs={len(self._runs)} "
                f"constraints=[{cons}]>")

    def _repr_html_(self):
        """A notebook's view: its project, its runs' counts, the controls in force."""
        st = self.status()
        runs = {r.run_id: r.totals() for r in list(self._runs.values())}
        for k in st["runs"]:  # (started, not begun yet)
            runs.setdefault(k, {})
        return _html(f"Engine project={self.project} id={self.id}: {len(st['runs'])} active "
                     "run(s)", [_count_section("runs", "run", runs), st._controls_section()])


class _Link:
    """An engine's link to a pub/sub connector: applies the retained control messages
    before a run's first task, follows control messages while runs are active, and
    publishes each run's telemetry (fire-and-forget; flushed, with a bound, before run
    returns). Each run's side of it is a _RunLink.

    One control subscription per event loop, shared by the engine's runs on it: every
    message is handled once and in order (a subscription per run handled each message
    once per run: one bad message warned per run, and de-duplicating them lost order).
    Runs on other loops of the same engine have their own, which converge to the same
    state since each sees every message in order."""

    FLUSH_TIMEOUT = 2.0
    SYNC_TIMEOUT = 5.0
    SYNC_ROUNDS = 12  # a sync that still hears controls waits at most this many timeouts

    def __init__(self, engine, connector, presence=None):
        _check_connector(connector)
        self.engine = engine
        self.connector = connector
        self.prefix = _prefix_of(connector)
        self.source = _source()
        self.remote = {}             # (scope, type) -> (the broker's constraint, its stamp)
        self._stamps = itertools.count()  # orders applies and full syncs (see _sync)
        self._lock = threading.Lock()     # remote and _subs: loops of several threads
        self.telemetry_down = False  # a telemetry publish failed, none has worked since
        self.telemetry_lost = 0      # events dropped since
        self.sync_down = False       # a sync failed, none has worked since
        self._subs = {}              # loop -> _LoopSubscription
        self.presence = None if presence is None else _Presence(self, presence)

    def attach(self, run):
        """The run's side of the link, made before its RunStarted."""
        return _RunLink(self, run)

    async def open(self, rl):
        """Join (or make) this loop's control subscription and sync: every retained
        constraint is applied when this returns, unless syncing is failing (then the run
        goes on at once with the controls applied so far, while the loop's subscription
        retries in the background: see _keep)."""
        loop = asyncio.get_running_loop()
        with self._lock:  # (runs on other loops open at the same time)
            sub = self._subs.get(loop)
            gone = []
            if sub is None:
                for lp, old in list(self._subs.items()):  # of loops that have closed since
                    if lp.is_closed():
                        del self._subs[lp]
                        gone.append(old)
                sub = self._subs[loop] = _LoopSubscription(self, loop)
                sub.watch()  # (before its first sync works: a reconnect retries it)
        for old in gone:
            old.unwatch()
            loop.create_task(self._leave(old))
        sub.runs += 1
        rl.sub = sub
        if self.presence is not None:
            self.presence.changed(start=True)
        if sub.failing and getattr(self.connector, "connects", None) == sub.failed_at:
            # (regression: with the broker down, every run waited 5 s); once the
            # connector has connected again since, the run syncs as ever
            self._keep(sub)
            return
        try:  # bounded: a connector that hangs must not stall the run
            await self._progressing(self._sync(sub), sub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(sub, exc)
            self._keep(sub)
        else:
            sub.failing = False
            self._sync_worked()

    async def _sync(self, sub, full=False):
        """One sync of ``sub`` (serialised on it): a marker round trip after which every
        control the broker retains has been applied. The first, and the first after a
        (re)connect of the connector (or ``full``), subscribes afresh and afterwards
        drops from the broker's layer what the broker no longer retains.

        The marker relies on the broker's per-connection ordering: the retained burst
        of a SUBSCRIBE, and messages published before our marker, reach the control
        subscription before the marker comes back, and both drain on this loop in
        order. Subscribing again (an MQTT SUBSCRIBE of the same filter replaces it and
        sends its retained messages again) is what makes the reconcile exact: ``seen``
        starts before the burst it counts (regression: after a broker restart that lost
        what it retained, a running run kept a pause nobody could see or lift)."""
        conn = self.connector
        async with sub.lock:
            while True:
                connects = getattr(conn, "connects", 0)
                full = full or connects != sub.connects
                await self._sync_once(sub, full, connects)
                if getattr(conn, "connects", 0) == connects:
                    return
                # (re)connected again meanwhile: what this sync saw may be the old
                # connection's; sync afresh (regression: a full sync that began before a
                # broker restart ended after it and kept the pause the broker had lost)
                full = True

    async def _sync_once(self, sub, full, connects):  # sub.lock held
        conn, loop = self.connector, sub.loop
        if not sub.connected:
            await conn.connect()
            sub.connected = True
        if full:
            sub.seen = set()
            with self._lock:
                since = next(self._stamps)  # what another loop applies later stays
            await conn.subscribe(f"{self.prefix}/constraints/#", sub.on_message)
            if not sub.subscribed:
                await conn.subscribe(sub.marker_filter, sub.on_marker)
                await conn.subscribe(_cancel_topic(self.prefix), sub.on_cancel)
                sub.subscribed = True
        marker = f"{sub.marker_filter[:-2]}/{next(sub.count)}"
        synced = sub.markers[marker] = loop.create_future()
        try:
            await conn.publish(marker, {"sync": marker}, qos=1)
            await synced
        finally:
            sub.markers.pop(marker, None)
        sub.apply()  # every control that came before the marker, before any task
        if full:
            seen, sub.seen = sub.seen, None
            cp = self.engine._cp
            with self._lock:
                # Not retained on the broker (cleared while nothing listened, or
                # lost in a restart): its layer goes (the engine's own control of
                # the key, if any, applies again), unless another loop of this
                # engine applied it since this sync began (a message this loop has
                # not handled yet: regression, a live control was dropped).
                stale = [k for k in self.remote if k not in seen
                         and self.remote[k][1] < since]
                for key in stale:
                    del self.remote[key]
            for key in stale:
                cp.remove(*key, origin="broker")
            sub.connects = connects  # synced as of this connection

    def _keep(self, sub, full=False):
        """Sync ``sub`` in the background until it works (after a failed sync, or a
        reconnect while runs are active): retried after 0.25 s, doubling up to 5 s, and
        at once when the connector reconnects. Cancelled when the loop's last run ends
        (the next run starts it again, without waiting for it)."""
        if sub.keeper is None or sub.keeper.done():
            sub.keeper = sub.loop.create_task(self._keeping(sub, full))

    async def _keeping(self, sub, full):
        delay = 0.25
        try:
            while sub.runs > 0 and self._subs.get(sub.loop) is sub:
                try:
                    await self._progressing(self._sync(sub, full=full), sub)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed(sub, exc)
                    sub.poke.clear()
                    timer = sub.loop.call_later(delay, sub.poke.set)
                    try:
                        await sub.poke.wait()
                    finally:
                        timer.cancel()
                    delay = min(delay * 2, 5.0)
                else:
                    sub.failing = False
                    self._sync_worked()
                    return
        finally:
            if sub.keeper is asyncio.current_task():  # (not a later keeper's)
                sub.keeper = None

    def _failed(self, sub, exc):
        sub.failing, sub.failed_at = True, getattr(self.connector, "connects", None)
        self._sync_failed(exc)

    def _sync_failed(self, exc):
        # quiet: one warning an outage for the engine, not one per run or retry
        if not self.sync_down:
            self.sync_down = True
            _log.warning("could not sync controls from %r (%r); runs go on with the "
                         "controls applied so far, and syncing is retried in the "
                         "background", self.connector, exc)
        else:
            _log.debug("sync of controls from %r failed again: %r", self.connector, exc)

    def _sync_worked(self):
        if self.sync_down:
            self.sync_down = False
            _log.info("controls are synced from %r again", self.connector)

    async def _progressing(self, coro, sub):
        """Await ``coro`` while it makes progress: TimeoutError once SYNC_TIMEOUT passes
        with no control message handled meanwhile, or after SYNC_ROUNDS of them in all
        (live traffic, a heartbeat, must not keep a sync whose marker never returns
        waiting for ever). (A wait bounded as a whole gave up on a retained burst still
        arriving: with 100,000 retained controls, 20,000 came after the first task.)"""
        task = asyncio.ensure_future(coro)
        try:
            for _ in range(self.SYNC_ROUNDS):
                heard = sub.heard
                done, _ = await asyncio.wait((task,), timeout=self.SYNC_TIMEOUT)
                if done:
                    return task.result()
                if sub.heard == heard:
                    raise TimeoutError(
                        f"the broker answered nothing for {self.SYNC_TIMEOUT:g}s (is it up, "
                        f"and may this client read {self.prefix}/constraints/# and read and "
                        f"write {self.prefix}/sync/#?)")
            raise TimeoutError(f"the broker kept sending controls for "
                               f"{self.SYNC_ROUNDS * self.SYNC_TIMEOUT:g}s without the sync "
                               "marker coming back")
        finally:
            task.cancel()

    def check(self, topic, payload, run_id=""):
        """Validate one control message (see _read_control): ``(key, constraint)``,
        ``(key, None)`` for the empty message (it removes the control), or, rejected
        with one warning and a ConstraintRejected event, ``(key, _MISSING)`` (the last
        valid control of the topic stays) or None when the topic is not a control topic
        at all."""
        key, c, reason = _read_control(topic, payload, self.prefix)
        if reason is None:
            if c is not None and c.params.get("shared") and self.engine.coordinator is None:
                # (the safest of the choices: the budget still holds on this engine; the
                # fleet may run up to this many on each engine without a coordinator)
                reason = (f"{_what(c)}: this engine has no coordinator "
                          "(Engine(coordinator=...)), so it holds as this engine's own limit")
                _log.warning("control message on %s: %s", _printable(topic), reason)
                self.engine._bus.emit(ConstraintRejected(run_id, topic, reason))
            return key, c
        _log.warning("rejected control message on %s: %s", _printable(topic),
                     _printable(reason))
        self.engine._bus.emit(ConstraintRejected(run_id, topic, reason))
        return None if key is None else (key, _MISSING)

    def cancel(self, sub, topic, payload):
        """A cancel command heard on ``sub``'s loop: cancel the matching tasks of the
        runs on that loop (see Engine.cancel) and answer how many on the ack topic. A bad
        command: one warning and a ConstraintRejected event, nothing else."""
        scope, cid, reason = _read_cancel(payload)
        if reason is not None:
            _log.warning("rejected cancel command on %s: %s", _printable(topic),
                         _printable(reason))
            self.engine._bus.emit(ConstraintRejected("", topic, reason))
            return
        e, me = self.engine, threading.get_ident()
        n = 0
        for run in list(e._runs.values()):
            if run.thread == me:  # (the runs on other loops: their own subscriptions)
                try:
                    n += run.cancel(scope)
                except Exception:
                    _log.exception("cancel of %s in run %s failed", scope, run.run_id)
        token = sub.marker_filter.rsplit("/", 2)[-2]
        _log.info("cancel of %s (id %s) from the broker: %d tasks cancelled", scope, cid, n)
        sub.loop.create_task(self.connector.publish(
            f"{self.prefix}/acks/{cid}/{e.id}/{token}",
            {"engine_id": e.id, "scope": scope, "cancelled": n}, qos=1)).add_done_callback(
                _quiet_future)

    def apply(self, key, c):
        """Set a checked control as the broker's layer of its key (``c``), or clear the
        broker's layer (None); the engine's own controls are never touched. (Loops of
        the engine that each hear the same messages in order converge to the same
        state: the last message of a key is each loop's last apply of it.)"""
        cp = self.engine._cp
        with self._lock:
            if c is None:
                self.remote.pop(key, None)
            else:
                old = self.remote.get(key)
                self.remote[key] = (c, next(self._stamps))
        if c is None:
            cp.remove(*key, origin="broker")
        elif old is None or old[0] != c:
            cp.apply(c, origin="broker")

    async def close(self, rl):
        """Flush the run's telemetry (bounded: a hung connector never stalls the run),
        then leave the loop's control subscription."""
        flusher = rl.flusher
        if flusher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(flusher), self.FLUSH_TIMEOUT)
            except (asyncio.TimeoutError, Exception):
                flusher.cancel()
                _log.warning("telemetry flush did not finish in %.1fs; dropped %d events",
                             self.FLUSH_TIMEOUT, len(rl.queue) + rl.unsent)
        sub = rl.sub
        if sub is not None:
            # The loop's subscription stays after its last run: the next run on this
            # loop syncs with one marker round trip, not a subscription and the whole
            # retained replay (a run over MQTT cost 5 ms, most of it that). Controls
            # that arrive meanwhile are applied as ever. It goes with its loop (see
            # open) or the engine (forget).
            sub.runs -= 1
            if self.presence is not None:
                self.presence.changed()
            if sub.runs == 0 and sub.keeper is not None:
                sub.keeper.cancel()  # nothing waits for it now (the next run restarts it)

    def publish_soon(self, topic, payload, wait=None):
        """Publish a retained message from any thread without waiting for it (paho: or
        up to ``wait`` seconds): True if it was handed over (the presence record's path:
        see _Presence)."""
        conn = self.connector
        try:
            if isinstance(conn, (LocalBroker, MqttConnector)):
                return conn.publish_soon(topic, payload, wait)
            # a connector of the user's own: through a loop of the engine's that runs
            loop = next((s.loop for s in list(self._subs.values()) if s.loop.is_running()),
                        None)
            if loop is None:
                return False
            asyncio.run_coroutine_threadsafe(
                conn.publish(topic, payload, qos=1, retain=True), loop).add_done_callback(
                    _quiet_future)
            return True
        except Exception as exc:
            _log.debug("publishing %s failed: %r", topic, exc)
            return False

    async def _leave(self, sub):
        """Unsubscribe ``sub`` (its loop has closed, or the engine is closing)."""
        for topic, callback in ((f"{self.prefix}/constraints/#", sub.on_message),
                                (sub.marker_filter, sub.on_marker),
                                (_cancel_topic(self.prefix), sub.on_cancel)):
            try:
                await asyncio.wait_for(_maybe(self.connector, "unsubscribe", topic, callback),
                                       self.FLUSH_TIMEOUT)
            except Exception:
                pass

    def forget(self):
        """The engine closes: its presence record goes, and it leaves every loop's
        subscription (on its loop, if it runs)."""
        if self.presence is not None:
            # (paho: waits up to 0.5 s for the ack, about a round trip: a process that
            # exits right after close() would otherwise leave its record behind)
            self.presence.stop(wait=0.5)
        with self._lock:
            subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub.unwatch()
            loop = sub.loop
            if not loop.is_closed() and loop.is_running():
                try:
                    asyncio.run_coroutine_threadsafe(self._leave(sub), loop)
                except RuntimeError:
                    pass


class _RunLink:
    """One run's side of its engine's _Link: the run's telemetry queue and flusher, and
    its share of its loop's control subscription (None until ``open``)."""
    __slots__ = ("link", "run", "queue", "flusher", "sub", "opened", "_frags", "unsent",
                 "counts", "changed")
    BATCH = 1000  # events per telemetry message at most
    # Bytes per telemetry message over a wire at most (one larger event goes alone): an
    # MqttConnector hands a larger payload to its subscribers raw, undecoded, so
    # `cascade watch` showed a message of 1,000 events (140 KB) as one line of data.
    MAX_BYTES = _MAX_PAYLOAD
    # Telemetry messages awaiting the broker's ack at once, over a wire: 8 left a busy
    # run's events queued (paho saw an ack every ~100 ms: a run of 20,000 tasks waited
    # 0.1 s at its end); more lets paho's thread write longer before it reads, so a
    # control coming in waits longer (32 did not send faster than 16).
    WINDOW = 16

    def __init__(self, link, run):
        self.link, self.run = link, run
        self.queue = collections.deque()   # (ts, record) not yet published
        self.flusher = None
        self.sub = None
        # set once the link is open (or the run closes without): the flusher waits for
        # it, since a record made before (ENGINE_STARTED) would find the connector not
        # connected yet and be dropped
        self.opened = asyncio.Event()
        self._frags = {}  # node -> its events' JSON around the state (see wire)
        self.unsent = 0   # events the flusher took from the queue and has not sent yet
        self.counts = {}  # telemetry="counts": map node -> {state: its items' events}
        self.changed = {}  # the map nodes counted since their last MapCountsEvent

    async def open(self):
        try:
            await self.link.open(self)
        finally:
            self.opened.set()

    async def close(self):
        self.opened.set()
        await self.link.close(self)

    # A record is (ts, word, status) for a lifecycle event (``status``: the run's, on
    # ENGINE_STOPPED), (ts, node, index, state, duration_ms, error) for a task's
    # (``index``: of a map item, else None) or (ts, node, items, counts) for a map's
    # counts: made by the next methods, read by payloads and wire (which derive ids and
    # names off the hot path). Not the _Unit itself: a record would keep it alive until
    # published, and allocating units in fresh memory made a map's expansion 2x slower.
    def lifecycle(self, word, status):
        if self.changed:  # a map's last counts come before the run's end
            self._snapshot()
        self.queue.append((time.time(), word, status))
        if self.flusher is None:
            self.flusher = asyncio.ensure_future(self._flush())

    def task(self, node, index, state, ms, error):
        self.queue.append((time.time(), node, index, state, ms, error))
        if self.flusher is None:
            self.flusher = asyncio.ensure_future(self._flush())

    def count(self, node, index, state, ms, error):
        """telemetry="counts": a map item's event is counted, not sent (its map's counts
        go out with the next message: see _snapshot); any other task's is sent."""
        if index is None:
            return self.task(node, index, state, ms, error)
        c = self.counts.get(node)
        if c is None:
            c = self.counts[node] = dict.fromkeys(_COUNTED, 0)
        c[state] += 1
        self.changed[node] = None
        if self.flusher is None:
            self.flusher = asyncio.ensure_future(self._flush())

    def _snapshot(self):
        """A MapCountsEvent record for every map counted since its last one."""
        now = time.time()
        for node in self.changed:
            self.queue.append((now, node, len(node.value),
                               {k: n for k, n in self.counts[node].items() if n}))
        self.changed = {}

    def payloads(self, items):
        """The telemetry messages of ``items`` (records): one message per BATCH events,
        stamped (``ts``, ISO 8601) with its first event's time; each event carries its
        own time as Unix seconds (``at``). See the README's telemetry contract."""
        engine = self.link.engine
        run_id, org, project, source = (self.run.run_id, engine.org, engine.project,
                                        self.link.source)
        events = []
        for r in items:
            if len(r) == 3:
                e = {"at": r[0], "type": "LifecycleEvent", "event": r[1]}
                if r[2] is not None:
                    e["status"] = r[2]
                events.append(e)
            elif len(r) == 4:
                at, node, n, counts = r
                events.append({"at": at, "type": "MapCountsEvent", "task_id": node.id,
                               "task_name": node.lazy.task.name, "items": n,
                               "counts": counts})
            else:
                at, node, index, state, ms, error = r
                events.append({"at": at, "type": "TaskStateEvent", "task_id": node.id
                               if index is None else f"{node.id}[{index}]",
                               "task_name": node.lazy.task.name, "state": state,
                               "duration_ms": ms,
                               "error": None if error is None else _error_text(
                                   error, engine.telemetry_errors)})
        n = self.BATCH
        return [{"v": _TELEMETRY_V, "ts": _iso(events[i]["at"]), "run_id": run_id,
                 "org_id": org, "project_id": project, "source": source,
                 "events": events[i:i + n]} for i in range(0, len(events), n)]

    def wire(self, items):
        """The messages of ``payloads`` as the bytes a broker carries, ``[(message, its
        number of events)]``, cut at BATCH events or MAX_BYTES, whichever comes first.
        Built as JSON text: json.dumps of the dicts cost 3 µs an event, as much as the
        trivial task itself. Of what was left, writing ``at`` to the microsecond cost
        the most (0.5 µs: more than all the rest of the event): it is written to the
        millisecond, which a burst's events share (``duration_ms`` to the microsecond).
        Strings are escaped to ASCII, so a message's characters are its bytes."""
        engine = self.link.engine
        mode, frags = engine.telemetry_errors, self._frags
        head = (f'","run_id":{_json_str(self.run.run_id)},"org_id":{_json_str(engine.org)},'
                f'"project_id":{_json_str(engine.project)},"source":'
                f'{_json_str(self.link.source)},"events":[')
        base = len(head) + 60  # + '{"v":"1.1","ts":"<ISO>' and ']}'
        cap = self.MAX_BYTES
        out, events, size, left, first = [], [], base, self.BATCH, 0.0
        nxt, t = 0.0, ""
        for r in items:
            at = r[0]
            if at >= nxt:  # a new millisecond: a burst's events share its text
                msec = int(at * 1000)
                nxt = (msec + 1) / 1000
                t = str(msec)
                t = t[:-3] + "." + t[-3:]  # (Unix seconds > 1, so never short)
            if len(r) == 6:
                _, node, index, state, ms, error = r
                f = frags.get(node)
                if f is None:  # JSON escapes once per node, not per event
                    if len(frags) >= 4096:  # (bounded: a fan-out has a node per call)
                        frags.clear()
                    f = frags[node] = self._fragments(node)
                ms = "null" if ms is None else "%.3f" % ms
                if error is not None:
                    e = (f'{{"at":{t}{f[0]}{"" if index is None else f"[{index}]"}",{f[1]}'
                         f'{state}","duration_ms":{ms},"error":'
                         f'{_json_str(_error_text(error, mode))}}}')
                elif index is None:
                    e = f'{{"at":{t}{f[0]}",{f[1]}{state}","duration_ms":{ms},"error":null}}'
                else:
                    e = (f'{{"at":{t}{f[0]}[{index}]",{f[1]}{state}","duration_ms":{ms},'
                         '"error":null}')
            elif len(r) == 3:
                e = (f'{{"at":{t},"type":"LifecycleEvent","event":"{r[1]}"' +
                     ("}" if r[2] is None else f',"status":"{r[2]}"}}'))
            else:
                _, node, n, counts = r
                e = (f'{{"at":{t},"type":"MapCountsEvent","task_id":{_json_str(node.id)},'
                     f'"task_name":{_json_str(node.lazy.task.name)},"items":{n},"counts":{{'
                     + ",".join(f'"{k}":{v}' for k, v in counts.items()) + "}}")
            size += len(e) + 1
            if (size > cap or not left) and events:
                out.append((f'{{"v":"{_TELEMETRY_V}","ts":"{_iso(first)}{head}'
                            f'{",".join(events)}]}}'.encode("ascii"), len(events)))
                events, size, left = [], base + len(e) + 1, self.BATCH
            if not events:
                first = at
            events.append(e)
            left -= 1
        if events:
            out.append((f'{{"v":"{_TELEMETRY_V}","ts":"{_iso(first)}{head}'
                        f'{",".join(events)}]}}'.encode("ascii"), len(events)))
        return out

    @staticmethod
    def _fragments(node):
        """The JSON of a node's events before its index (a map item's) and around its
        state, escaped once."""
        return (f',"type":"TaskStateEvent","task_id":{_json_str(node.id)[:-1]}',
                f'"task_name":{_json_str(node.lazy.task.name)},"state":"')

    async def _flush(self):
        engine = self.link.engine
        topic = f"{self.link.prefix}/telemetry/{engine.org}/{engine.project}/{self.run.run_id}/events"
        conn = self.link.connector
        batch = getattr(conn, "publish_many_nowait", None)  # LocalBroker's
        # Over a wire: the bytes themselves, WINDOW messages awaiting their acks at once
        # (the order holds: each publish hands its message to the client before it
        # awaits). To any other connector: dicts (its contract), one at a time.
        wire = isinstance(conn, MqttConnector)
        build, window = (self.wire, self.WINDOW) if wire else (self.payloads, 1)
        # At most CHUNK records a loop turn: telemetry never holds the loop, so control
        # messages get in between (regression: the BLOCKED records of a 100,000-item map
        # were published in one go, and a pause sent then was applied 0.8 s-5 s later).
        chunk = self.BATCH * (10 if batch is not None else 4 if wire else 1)
        acks = collections.deque()  # (publish task, its events) awaiting their acks
        try:
            await self.opened.wait()
            while self.queue or acks or self.changed:
                if self.changed:  # the maps counted since: their counts now
                    self._snapshot()
                if not self.queue:
                    await self._acked(acks)
                    continue
                items, self.queue = self.queue, collections.deque()  # ours alone now
                left, records = len(items), iter(items)
                self.unsent += left
                while left:
                    n = min(left, chunk)
                    left -= n
                    messages = _without_gc(build, itertools.islice(records, n))
                    if batch is not None:  # in process: every message in one call
                        self.unsent -= n
                        try:
                            batch(topic, messages)
                        except Exception as exc:
                            self._sent(n, exc)
                        else:
                            self._sent(n, None)
                    else:
                        # QoS 1, each message awaiting the broker's ack, at most WINDOW
                        # at once: the connection's queue stays short, so a control
                        # coming in is read at once (with QoS 0 the BLOCKED records of
                        # a 100,000-item map queued 15 MB ahead of it: a pause was read
                        # 1 s late), and telemetry is not lost to a full buffer. (One at
                        # a time, a busy loop sent a message every turn or two: a run of
                        # 50,000 trivial tasks ended with 95% of its events queued.)
                        for m in messages:
                            m, k = m if wire else (m, len(m["events"]))
                            while len(acks) >= window:
                                await self._acked(acks)
                            acks.append((asyncio.ensure_future(conn.publish(topic, m, qos=1)),
                                         k))
                    if left:
                        await asyncio.sleep(0)  # (the rest after a turn of the loop)
        finally:
            self.flusher = None
            for t, _ in acks:
                t.cancel()

    async def _acked(self, acks):
        """Wait for the oldest message in ``acks`` to be acknowledged, or to fail (the
        broker acknowledges in order). (asyncio.wait: a cancellation of the flusher
        leaves the publish in ``acks``, for the flusher's clean-up to cancel.)"""
        t, n = acks[0]
        await asyncio.wait((t,))
        acks.popleft()
        self.unsent -= n
        self._sent(n, asyncio.CancelledError() if t.cancelled() else t.exception())

    def _sent(self, n, exc):
        """``n`` events were published (``exc`` None) or not: telemetry never fails a run,
        and stays quiet: one warning an outage (for the engine, not per run or message:
        a 3 s outage once gave 142), one info line when it is over."""
        link = self.link
        if exc is not None:
            link.telemetry_lost += n
            if not link.telemetry_down:
                link.telemetry_down = True
                _log.warning("telemetry publish failed (%r); dropping telemetry until the "
                             "broker takes it again", exc)
        elif link.telemetry_down:
            link.telemetry_down = False
            _log.info("telemetry publishing works again; %d events were dropped meanwhile",
                      link.telemetry_lost)
            link.telemetry_lost = 0


_json_str = json.encoder.encode_basestring_ascii  # a str as a JSON string literal (C)
_iso_second = (0, "1970-01-01T00:00:00")  # (second, its text): one tuple, swapped whole


class _LoopSubscription:
    """The control subscription of a _Link on one event loop, shared by its runs.

    Control messages are checked as they arrive (a bad one is rejected at once, with its
    warning and event) and coalesced: the valid ones that arrive together are applied in
    one loop callback, and a later one for a topic supersedes an earlier one still
    waiting (the last message for a (scope, type) wins, and a storm costs one apply per
    topic per loop turn, not one per message)."""
    __slots__ = ("link", "loop", "runs", "lock", "connected", "subscribed", "failing",
                 "keeper", "poke", "seen", "pending", "heard", "marker_filter", "markers",
                 "count", "connects", "failed_at")

    def __init__(self, link, loop):
        self.link, self.loop, self.runs = link, loop, 0
        self.lock = asyncio.Lock()          # one sync at a time (see _Link._sync)
        self.connected = False              # connector.connect() done
        self.subscribed = False             # both filters subscribed (once)
        self.failing = False                # the last sync failed: runs do not wait
        self.keeper = None                  # the task retrying the sync (_Link._keep)
        self.poke = asyncio.Event()         # wakes the keeper early (a reconnect)
        self.seen = None                    # keys heard during a full sync
        self.pending = {}                   # (scope, type) -> its latest checked control
        self.heard = 0                      # messages handled (a sync waits while it grows)
        self.marker_filter = f"{link.prefix}/sync/{os.urandom(8).hex()}/+"  # its runs' markers
        self.markers = {}                   # marker topic -> the future its run awaits
        self.count = itertools.count()
        self.connects = None                # the connector's connects at the last full sync
        self.failed_at = None               # ... when a sync last failed

    def watch(self):
        """Be told of the connector's reconnects (MqttConnector's paho clients): a
        reconnect re-syncs at once while runs are active, not at the next run."""
        conn = self.link.connector
        if isinstance(conn, MqttConnector):
            with conn._lock:
                conn._watchers.append((self.loop, self.on_reconnect))

    def unwatch(self):
        conn = self.link.connector
        if isinstance(conn, MqttConnector):
            with conn._lock:
                conn._watchers = [w for w in conn._watchers if w[1] != self.on_reconnect]
        if self.keeper is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.poke.set)  # so it sees it is gone
            except RuntimeError:
                pass

    def on_reconnect(self):  # on the loop, called soon after the connector reconnected
        if self.runs > 0:
            self.link._keep(self, full=True)
        self.poke.set()

    def on_cancel(self, topic, payload):  # on the loop: a one-shot cancel command
        self.link.cancel(self, topic, payload)

    def on_marker(self, topic, payload):
        fut = self.markers.get(topic)
        if fut is not None and not fut.done():
            fut.set_result(None)

    @_latest_only  # of a topic's messages still queued, only the newest is checked
    def on_message(self, topic, payload):
        self.heard += 1
        checked = self.link.check(topic, payload)
        if checked is None:
            return
        key, c = checked
        if self.seen is not None:
            self.seen.add(key)
        if c is _MISSING:  # rejected: the topic's last valid control stays
            return
        if not self.pending:
            self.loop.call_soon(self.apply)
        self.pending[key] = c

    def apply(self):
        """Apply the waiting control messages (also called by a sync before it ends)."""
        pending, self.pending = self.pending, {}
        for key, c in pending.items():
            try:
                self.link.apply(key, c)
            except Exception:  # one control must not cost the others of its batch
                _log.exception("applying the control of %s/%s failed", *key)


def _engine_record(e, source, started_at, heartbeat, listed, total):
    """What an engine shows of itself, as a JSON object: its presence record on the
    broker, and what ``engine.serve`` shows. ``listed``: the constraints to list (of
    ``total``). Each run with its progress (``done`` of ``total`` units so far) and its
    per-task counts; what the waiting tasks wait on, grouped; each control with its
    usage; the shared controls' fleet usage; the last finished runs. Kept under
    _RECORD_BYTES by listing less detail (``trimmed``) where it would not fit."""
    runs = []
    for r in list(e._runs.values()):
        tasks = r.counts()
        counts = _Run.total_of(tasks)
        n = sum(counts.values())
        runs.append({"run_id": r.run_id, "counts": dict(counts), "total": n,
                     "done": sum(counts[k] for k in _DONE_STATES if k in counts),
                     "started_at": getattr(r, "started_at", None), "tasks": tasks})
    now = time.time()
    cp = e._cp
    with cp.lock:
        mono = time.monotonic()
        usage = {}
        for c in listed:
            st = cp._states.get((c.scope, c.type))
            if st is not None:
                try:
                    row = dict(st.usage(mono), matching_running=0)
                    usage[(c.scope, c.type)] = (_CONTROL_TYPES[c.type].shows(row),
                                                row.get("busiest"))
                except Exception:  # a failing state is being removed
                    pass
    rec = {"v": "1", "engine_id": e.id, "source": source, "org": e.org,
           "project": e.project, "version": __version__, "started_at": started_at,
           "updated_at": now, "heartbeat": heartbeat, "runs": runs,
           "constraints": [{"scope": c.scope, "type": c.type, "params": dict(c.params),
                            "origin": c.origin, "expires_at": c.expires_at,
                            "expires_in": c.expires_in(now),
                            **_usage_fields(usage.get((c.scope, c.type)))} for c in listed],
           "constraints_total": total, "blocked": cp.waiting(_Presence.MAX_CONSTRAINTS),
           "history": e._history.entries(), **_Presence.shared(e)}
    return _fit(rec)


def _usage_fields(got):
    """A listed control's usage fields in a record: ``usage`` (a line), and ``busiest``
    ({key value: in use}, the busiest values of a per-key limit) where it has them."""
    if got is None:
        return {}
    text, busiest = got
    return {"usage": text, **({"busiest": busiest} if busiest else {})}


_RECORD_BYTES = 60_000  # a record stays under the 64 KiB a reader parses (_MAX_PAYLOAD)
_DONE_STATES = ("done", "failed", "skipped", "cached")  # a unit that has ended


def _fit(rec):
    """``rec`` cut down, one step at a time, until its JSON is under _RECORD_BYTES:
    fewer tasks per run, finished runs, blocked groups, runs, then controls listed, and
    last none of any list (controls on long scopes pass 60 KB even 20 at a time)."""
    steps = (("runs", "tasks", 20), ("history", None, 5), ("blocked", None, 20),
             ("runs", None, 20), ("runs", "tasks", 0), ("constraints", None, 20),
             ("shared", None, 20), ("history", None, 0), ("blocked", None, 0),
             ("runs", None, 0), ("constraints", None, 0), ("shared", None, 0))
    for field, inner, keep in steps:
        if len(json.dumps(rec, default=repr)) < _RECORD_BYTES:
            break
        if field not in rec:  # (shared: only with a coordinator)
            continue
        rec.setdefault("trimmed", []).append(f"{field}.{inner}" if inner else field)
        if inner is None:
            rec[field] = rec[field][:keep]
        else:
            for r in rec[field]:
                busiest = sorted(r[inner].items(), key=lambda kv: -sum(kv[1].values()))
                r[inner] = dict(busiest[:keep])
    return rec


class _Presence:
    """An engine's presence record, retained on ``<prefix>/engines/<org>/<project>/<engine
    id>`` so an operator sees which engines exist and what each enforces (``Controller
    .engines()``, ``cascade status``). See the README's fleet view for the payload.

    Published from the engine's clock thread (never a run's loop): first when a run
    opens its link, then within THROTTLE seconds of a change (a control applied or
    removed, a run begun or ended, task counts moving while runs are active), at most
    once per THROTTLE, and at least every ``heartbeat`` seconds; removed (an empty
    retained message) when the engine closes. A reader counts a record whose
    ``updated_at`` is more than LOST heartbeats old as lost (a crashed engine)."""
    THROTTLE = 0.25
    LOST = 3
    MAX_CONSTRAINTS = 100  # listed in a record at most (``constraints_total`` counts all)

    def __init__(self, link, heartbeat):
        self.link, self.heartbeat = link, float(heartbeat)
        e = link.engine
        self.topic = f"{link.prefix}/engines/{e.org}/{e.project}/{e.id}"
        self.clock = e._cp.clock
        self.started_at = time.time()
        self.lock = threading.Lock()
        self.live = False    # between the first run's open and close
        self.closed = False
        self.entry = None    # the clock entry of the next tick, due at ``due``
        self.due = 0.0
        self.said = None     # what the last record sent said (times left out)
        self.listed = None   # (control plane generation, the constraints listed, total)
        self.sent_at = None  # time.monotonic() of it

    def record(self):
        e = self.link.engine
        gen = e._cp._gen
        if self.listed is None or self.listed[0] != gen:
            # only when the controls changed: this runs on the clock thread, which also
            # fires TTL expiries (regression: sorting 100,000 controls 4 times a second
            # made expiries up to 154 ms late)
            cons = e.constraints
            self.listed = (gen, heapq.nsmallest(self.MAX_CONSTRAINTS, cons,
                                                key=lambda c: (c.scope, c.type)), len(cons))
        _, listed, total = self.listed
        return _engine_record(e, self.link.source, self.started_at, self.heartbeat, listed,
                              total)

    @staticmethod
    def shared(e):
        """The shared controls' fleet usage (``shared``, only with a coordinator): what
        this engine holds of each, and the fleet's as of its last round trip."""
        fleet = e._cp.fleet
        if fleet is None:
            return {}
        with e._cp.lock:
            return {"shared": [{"scope": key[0], "type": key[1], **(
                {"value": st.value} if st.owner is not None else {}), **st.usage(None)}
                               for st, (key, _) in list(fleet.states.items())
                               if st.active][:_Presence.MAX_CONSTRAINTS]}

    def changed(self, start=False):  # any thread
        with self.lock:
            if start and not self.closed and not self.live:
                self.live = True
                _at_exit(self)
            if self.live:
                self._tick_in(0.0 if self.sent_at is None else self.THROTTLE)

    def _tick_in(self, delay):  # lock held: the next tick, moved sooner only
        when = time.monotonic() + delay
        if self.entry is not None:
            if self.due <= when:
                return
            self.clock.cancel(self.entry)
        self.due, self.entry = when, self.clock.call_at(when, self._tick)

    def _tick(self):  # on the clock thread
        with self.lock:
            self.entry = None
            if not self.live:
                return
        try:
            rec = self.record()
        except Exception:  # a record must never kill the heartbeat
            _log.exception("building the presence record failed")
            rec = None
        now = time.monotonic()
        if rec is not None:
            said = (rec["runs"], [dict(c, expires_in=None) for c in rec["constraints"]])
            beat = self.sent_at is None or now - self.sent_at >= self.heartbeat * 0.99
            if said != self.said or beat:
                with self.lock:  # (never after stop's removal: it would bring it back)
                    if self.live and self.link.publish_soon(self.topic, rec):
                        self.said, self.sent_at = said, now
        with self.lock:
            if self.live:
                busy = bool(self.link.engine._runs)  # counts move: look again soon
                wait = self.heartbeat - (now - (self.sent_at or now))
                self._tick_in(min(self.THROTTLE, wait) if busy else max(wait, self.THROTTLE))

    def stop(self, wait=None):
        """The engine closes (or the process exits: see _at_exit, which waits up to
        ``wait`` seconds for paho to send it): no more ticks, and the record goes from
        the broker."""
        with self.lock:
            was, self.live, self.closed = self.live, False, True
            if self.entry is not None:
                self.clock.cancel(self.entry)
                self.entry = None
            if was:
                self.link.publish_soon(self.topic, "", wait)
        _LIVE_PRESENCES.discard(self)


_LIVE_PRESENCES = weakref.WeakSet()  # of engines not closed, removed at exit (_at_exit)


def _at_exit(presence):
    """Remove ``presence`` when the process exits normally without closing its engine
    (its MQTT client must still be connected then: paho's network thread runs until
    the interpreter finalises; 1 s at most is spent waiting for acks). A crash leaves
    it to be shown lost, or to the client's last will (see Engine.presence_topic)."""
    if not _LIVE_PRESENCES:
        import atexit  # (built in, and imported by site already)
        atexit.unregister(_remove_presences)
        atexit.register(_remove_presences)
    _LIVE_PRESENCES.add(presence)


def _remove_presences():
    deadline = time.monotonic() + 1.0
    for p in list(_LIVE_PRESENCES):
        try:
            p.stop(wait=max(0.01, deadline - time.monotonic()))
        except Exception:  # at exit: nothing may raise
            pass


def _iso(ts):
    """ISO 8601 UTC with microseconds; the formatted second is reused (hot path)."""
    global _iso_second
    sec = int(ts)
    cached = _iso_second
    if cached[0] != sec:
        cached = _iso_second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{int((ts - sec) * 1e6):06d}Z"


_MAX_ERROR_TEXT = 500  # characters of an error (or a reason) that telemetry carries


def _error_text(error, mode):
    """What telemetry says of an error: ``"Type: message"`` capped at _MAX_ERROR_TEXT
    characters, or with ``mode="type"`` the exception's type alone (messages can hold
    secrets: an API key in a URL). Reasons (str) pass, capped."""
    if isinstance(error, str):
        text = error
    elif mode == "type":
        return type(error).__name__
    else:
        text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT - 1] + "…"


def _printable(text):
    """``text`` safe for a terminal: control characters, bidi overrides and other
    non-printable characters are shown escaped (\\x1b, \\u202e), never sent raw."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


async def _to_the_end(aw):
    """Await ``aw`` to its end even if this task is cancelled meanwhile; returns whether
    a cancellation arrived, for the caller to raise once its clean-up is done."""
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            await asyncio.shield(fut)
            return cancelled
        except asyncio.CancelledError:
            if fut.done():  # it was cancelled itself, not us
                return True
            cancelled = True


async def _maybe(obj, method, *args):
    fn = getattr(obj, method, None)
    if fn is not None:
        await fn(*args)


def _check_connector(connector):
    missing = [m for m in ("connect", "disconnect", "publish", "subscribe")
               if not callable(getattr(connector, m, None))]
    if missing:
        raise TypeError(f"connector {connector!r} lacks {missing}; a connector has async "
                        "connect(), disconnect(), publish(topic, payload, qos=0, retain=False) "
                        "and subscribe(topic, callback) (cs.LocalBroker, cs.MqttConnector)")
    return connector


# ===========================================================================
# run(): the one-call entry point, with logging and progress
# ===========================================================================

class _LogEvents:
    """Turns events into log lines on the library's logger (used by ``run``)."""

    # The highest level each event type can be logged at: a run subscribes only to what
    # its level can print (at WARNING, a success costs no event at all).
    MOST = {RunStarted: logging.INFO, RunFinished: logging.ERROR,
            TaskExecutionFinished: logging.INFO, _TaskFailures: logging.ERROR,
            TaskRetrying: logging.WARNING, TaskSkipped: logging.INFO,
            TaskBlocked: logging.INFO, ConstraintApplied: logging.INFO,
            ConstraintRemoved: logging.INFO}

    def __init__(self, run_id=None):
        self.blocked = set()  # (run_id, task name, reason) logged as blocked
        self.run_id = run_id  # only this run's events (and the engine's: run_id "")

    def subscribe(self, engine):
        """Subscribe to what the logger's effective level can print; returns the
        unsubscribe functions."""
        level = _log.getEffectiveLevel()
        if level <= logging.DEBUG:
            return [engine.subscribe(Event, self)]
        types = [t for t, most in self.MOST.items() if most >= level]
        if TaskExecutionFinished in types:
            types.remove(_TaskFailures)  # the failures come with the rest
        return [engine.subscribe(t, self) for t in types]

    def __call__(self, e):
        if self.run_id is not None and e.run_id and e.run_id != self.run_id:
            return  # another run of an engine passed to cs.run(engine=)
        t = type(e)
        lvl, msg = logging.DEBUG, None
        if t is RunStarted:
            names = collections.Counter(e.target_tasks)  # (1,000 calls: "save (1000 calls)")
            lvl, msg = logging.INFO, f"run {e.run_id} started: " + ", ".join(
                n if k == 1 else f"{n} ({k} calls)" for n, k in names.items())
        elif t is RunFinished:
            lvl = logging.INFO if e.status == "Succeeded" else logging.ERROR
            msg = f"run {e.run_id} {e.status.lower()} in {e.duration:.3f}s" + (
                f": {type(e.error).__name__}: {_printable(e.error)}" if e.error else "")
        elif t is TaskExecutionStarted:
            msg = f"{e.task_id} started"
        elif t is TaskExecutionFinished:
            if e.status == "Succeeded":  # map items only at DEBUG: a map of 10,000 is one story
                lvl = logging.DEBUG if e.task_id.endswith("]") else logging.INFO
                msg = f"{e.task_id} succeeded in {e.duration:.3f}s"
            else:
                lvl, msg = logging.ERROR, (f"{e.task_id} failed: {type(e.error).__name__}: "
                                           f"{_printable(e.error)}")
        elif t is TaskRetrying:
            lvl, msg = logging.WARNING, (f"{e.task_id} attempt {e.attempt}/{e.max_attempts} "
                                         f"failed ({type(e.error).__name__}: "
                                         f"{_printable(e.error)}); "
                                         f"retrying in {e.delay:g}s")
        elif t is TaskSkipped:
            lvl, msg = logging.INFO, f"{e.task_id} skipped: {_printable(e.reason)}"
        elif t is TaskCached:  # (DEBUG: a re-run of 10,000 is one story)
            msg = f"{e.task_id} taken from the store ({e.source})"
        elif t is TaskBlocked:
            # one line per task name and reason in a run, not per item (a 2,000-item
            # map under a limit logged 1,997 lines); status() has the count
            said = (e.run_id, e.task_name, e.reason)
            if said in self.blocked:
                return
            self.blocked.add(said)
            lvl, msg = logging.INFO, (f"{e.task_id} blocked: {_printable(e.reason)} (later "
                                      f"{e.task_name} tasks blocked so are not logged)")
        elif t in (ConstraintApplied, ConstraintRemoved):
            lvl = logging.INFO
            msg = f"{'applied' if t is ConstraintApplied else 'removed'} {e.constraint.describe()}"
        else:
            msg = f"{t.__name__} {e}"
        if _log.isEnabledFor(lvl):
            fields = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
            fields["event"] = t.__name__
            _log.log(lvl, msg, extra={"cascade": fields})


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        out = {"ts": _iso(record.created), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for k, v in getattr(record, "cascade", {}).items():
            out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else (
                v.to_dict() if isinstance(v, Constraint) else
                f"{type(v).__name__}: {v}" if isinstance(v, BaseException) else
                list(v) if isinstance(v, tuple) else v if isinstance(v, dict) else str(v))
        return json.dumps(out, default=str)


class _Progress:
    """A live one-line status on stderr: how many of the run's task executions have
    finished, of how many (with a percentage and an ETA once every map knows its
    length), then done / running / blocked / failed. Redrawn on events, at most every
    0.1 s (a one-shot timer draws the last change). On a terminal, cs.run's log handler
    (_LogHandler) clears the line before each log line and draws it again after, under
    ``lock``, so the two never run together. In a Jupyter kernel (whose stderr is no
    terminal) it is one display, shown when the run starts and updated in place at the
    same pace, its final state last (see _notebook_display); elsewhere only the final
    line is written."""

    def __init__(self, engine, run_id=None, stream=None):
        self.engine = engine
        self.run_id = run_id  # its events only (the engine may run others meanwhile)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # IPython's display() in a kernel, when we write to its stderr (not a terminal)
        self.display = None if self.tty or stream is not None else _notebook_display()
        self.shown_as = None    # ... the DisplayHandle of the display it updates
        self.outcome = None     # the run's RunFinished status, for that display
        self.lock = threading.RLock()
        self.shown = False      # a status line without its newline is on the terminal
        self.done = self.failed = self.skipped = self.retrying = self.cached = 0
        self.running, self.blocked = set(), set()
        self.last = 0.0
        self.timer = None
        self.run = None         # the _Run, for its totals
        self.t0 = None
        self.maps = None        # its map nodes whose length is not known yet
        self.ended = False      # the final line is drawn

    def __call__(self, e):
        if self.run_id is not None and e.run_id != self.run_id:
            return
        t = type(e)
        if t is TaskExecutionStarted:
            self.blocked.discard(e.task_id)
            self.running.add(e.task_id)
        elif t is TaskExecutionFinished:
            self.running.discard(e.task_id)
            if e.status == "Succeeded":
                self.done += 1
            else:
                self.failed += 1
        elif t is TaskRetrying:
            self.running.discard(e.task_id)
            self.retrying += 1
        elif t is TaskBlocked:
            self.blocked.add(e.task_id)
        elif t is TaskSkipped:
            self.skipped += 1
        elif t is TaskCached:
            self.cached += 1
        elif t is RunStarted:
            self.run = self.engine._runs.get(e.run_id)
            self.t0 = time.monotonic()
            if self.display is not None:  # the display goes above the run's log lines
                self.draw()
            return
        elif t is RunFinished:
            if self.timer:
                self.timer.cancel()
            self.outcome = e.status
            self.draw(end="\n")
            self.ended = True
            return
        else:
            return
        now = time.monotonic()
        if now - self.last >= 0.1:
            self.draw()
        elif self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(0.1, self.draw)
            except RuntimeError:
                pass

    def total(self):
        """(finished, total) task executions of the run, once every map of it knows its
        length (a map over a lazy result learns it when that value arrives) and no graph
        that a task returned is still running (it may add tasks: a recursion one a
        level); else None."""
        run = self.run
        if run is None or not run.nodes or run.returning:
            return None
        if self.maps is None:
            self.maps = [n for n in run.nodes.values() if isinstance(n.lazy, MappedLazyResult)]
        if self.maps:
            self.maps = [n for n in self.maps if n.value is None and n.skip is None]
            if self.maps:
                return None
        total = finished = 0
        for t in list(run.tallies.values()):  # (dropped ones too: a failed run's total stays)
            total += sum(t) - t[_RUNNING]  # (the GRANTED cell counts running units too)
            finished += t[_DONE] + t[_FAILED] + t[_SKIPPED] + t[_CACHED]
        return (finished, total) if total else None

    def parts(self, end=""):
        """(how far: "120/500 (24%) ETA 41s" or "" while the total is unknown, and
        [(state, count)]): what the line and the notebook display show."""
        head = ""
        known = self.total()
        if known is not None:
            finished, total = known
            head = f"{finished}/{total} ({100 * finished // total}%)"
            if not end and 0 < finished < total:
                took = time.monotonic() - self.t0
                head += f" ETA {_duration(took / finished * (total - finished))}"
        return head, [("done", self.done), ("running", len(self.running)),
                      ("blocked", len(self.blocked)), ("failed", self.failed),
                      *((k, n) for k, n in (("skipped", self.skipped), ("cached", self.cached),
                                            ("retries", self.retrying)) if n)]

    def line(self, end=""):
        head, counts = self.parts(end)
        return (f"{head} | " if head else "") + " | ".join(f"{k} {n}" for k, n in counts)

    def show(self, end):
        """The notebook display: shown once, then updated in place."""
        head, counts = self.parts(end)
        run = f"run {self.run_id}" if self.run_id else "run"
        caption = f"[cascade] {run}: {self.outcome or 'running'}" + (f", {head}" if head else "")
        bundle = {"text/plain": f"[cascade] {self.line(end)}",
                  "text/html": _html(caption, [(None, [k for k, _ in counts],
                                                [[n for _, n in counts]])])}
        if self.shown_as is None:
            self.shown_as = self.display(bundle, raw=True, display_id=True)
        else:
            self.shown_as.update(bundle, raw=True)

    def draw(self, end=""):
        with self.lock:
            self.timer = None
            self.last = time.monotonic()
            if self.display is not None:
                try:
                    self.show(end)
                    return
                except Exception:  # (a kernel whose display fails: text from now on,
                    self.display = None  # not an error logged at every event)
            if self.tty:
                self.stream.write(f"\r\x1b[2K[cascade] {self.line(end)}{end}")
                self.shown = not end
            elif end:  # a log file gets the final line only, not a stream of redraws
                self.stream.write(f"[cascade] {self.line(end)}{end}")
            self.stream.flush()

    def clear(self):
        """Before a log line (lock held): wipe the status line, so the log line starts
        at the beginning of a clean line."""
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.shown = False


def _notebook_display():
    """IPython's ``display`` when this process is a Jupyter kernel, else None. Only
    looked for when IPython is imported already (a kernel has imported it), so a
    script never pays for importing it."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        shell = ipython.get_ipython()
        if shell is None or getattr(shell, "kernel", None) is None:  # a terminal IPython
            return None
        from IPython.display import display
    except Exception:  # a broken or partial IPython: text, as without it
        return None
    return display


def _duration(seconds):
    """``5s``, ``3m05s``, ``2h07m``: an ETA."""
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _LogHandler(logging.StreamHandler):
    """cs.run's log handler: with a progress line on the terminal, each log line clears
    it first and draws it again after (the status line stays last, and whole)."""

    def __init__(self, stream, progress=None):
        super().__init__(stream)
        self.progress = progress if progress is not None and progress.tty else None

    def emit(self, record):
        p = self.progress
        if p is None:
            return super().emit(record)
        with p.lock:
            p.clear()
            super().emit(record)
            if not p.ended:
                p.draw()


async def run_async(target: Any, params: Optional[dict] = None, *,
                    system_resources: Optional[dict] = None, resources: Iterable[Resource] = (),
                    connector: Any = None, log_level: Union[str, int] = "INFO",
                    log_format: str = "human", progress: bool = False,
                    engine: Optional[Engine] = None, store: Any = None,
                    run_id: Optional[str] = None) -> Any:
    """The async twin of ``run``: ``await cs.run_async(target)``."""
    if log_format not in ("human", "json"):
        raise ValueError(f"log_format={log_format!r}: use 'human' or 'json'")
    level = logging.getLevelName(log_level.upper()) if isinstance(log_level, str) else log_level
    if not isinstance(level, int):
        raise ValueError(f"log_level={log_level!r} is not a logging level name")
    _check_store(store)
    own = engine is None
    if own:
        engine = Engine(system_resources=system_resources, resources=resources,
                        connector=connector)
    else:
        _check_engine_options(engine, system_resources, connector, resources)
    handler = None
    durable = run_id is not None
    try:
        run_id = engine._check_run_id(run_id)
    except ValueError:
        if own:
            engine.close()
        raise
    show = _Progress(engine, run_id) if progress else None
    if not _log.handlers:
        handler = _LogHandler(sys.stderr, show)
        handler.setFormatter(_JsonFormatter() if log_format == "json" else
                             logging.Formatter("%(asctime)s %(levelname)-7s %(message)s",
                                               "%H:%M:%S"))
        handler.setLevel(level)
        old_level = _log.level
        _log.addHandler(handler)
        _log.setLevel(level)
    unsubs = _LogEvents(run_id).subscribe(engine)
    if show is not None:
        unsubs.append(engine.subscribe(Event, show))
    try:
        return await engine._run(target, params, run_id, store, durable)
    finally:
        for u in unsubs:
            u()
        if handler is not None:
            _log.removeHandler(handler)
            _log.setLevel(old_level)
        if own:
            engine.close()


def _check_engine_options(engine, system_resources, connector, resources):
    """``run(..., engine=e)``: the engine's own options are set where it was made, so
    passing them again is an error that says so; ``resources`` are registered on it."""
    if not isinstance(engine, Engine):
        raise TypeError(f"run(..., engine=...) takes a cs.Engine, got {engine!r}")
    given = [n for n, v in (("system_resources", system_resources), ("connector", connector))
             if v is not None]
    if given:
        raise TypeError(f"run(..., engine=e) got {' and '.join(given)} too: they are the "
                        f"engine's, so pass them where it is made, cs.Engine("
                        f"{', '.join(f'{n}=...' for n in given)}), or leave engine= out")
    for r in resources:
        engine.register(r)


def run(target: Any, params: Optional[dict] = None, *, system_resources: Optional[dict] = None,
        resources: Iterable[Resource] = (), connector: Any = None,
        log_level: Union[str, int] = "INFO", log_format: str = "human",
        progress: bool = False, engine: Optional[Engine] = None, store: Any = None,
        run_id: Optional[str] = None) -> Any:
    """Run ``target`` and return its value: on a new default engine, closed after the
    run, or on ``engine`` (left open: its limits, pauses and resources apply; options
    that belong to the engine, ``system_resources`` and ``connector``, are a TypeError
    with it, and ``resources`` are registered on it, as ``engine.register`` does).

    Logs run and task events to stderr at ``log_level`` (human lines, or JSON lines with
    ``log_format="json"``) through a handler attached for this run only, and only when the
    library's logger has no handler of its own; ``progress=True`` shows a live status
    line. Works in a notebook too: where an event loop already runs in this thread, the
    run happens on a helper thread (``await cs.run_async(...)`` is the async twin).

    ``store`` (over the engine's own) and ``run_id``: a run with both is checkpointed, so
    running it again with that id after a crash or a failure skips what finished; calls
    ``with_cache`` need a store (see ``Engine``).

    A failure raises the task's own exception, chained to nothing of the engine's. Ctrl-C
    cancels the run (see _run_interruptibly) and raises ``KeyboardInterrupt`` from here."""
    coro = run_async(target, params, system_resources=system_resources,
                     resources=resources, connector=connector, log_level=log_level,
                     log_format=log_format, progress=progress, engine=engine, store=store,
                     run_id=run_id)
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    # (called outside the except clause: inside it, whatever the run raised would be
    # chained to that RuntimeError, "During handling of the above exception ...")
    if not in_loop:
        value = _run_interruptibly(coro)
        if value is _INTERRUPTED:  # raised here, the traceback is the user's call and this
            raise KeyboardInterrupt
        return value
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cascade-run") as ex:
        return ex.submit(asyncio.run, coro).result()


_INTERRUPTED = object()  # what _run_interruptibly returns when Ctrl-C cancelled the run


def _run_interruptibly(coro):
    """``asyncio.run(coro)`` where Ctrl-C cancels: the first cancels the run (which
    cleans up, waiting up to ``stop_grace`` for running bodies), the second cancels it
    again (it stops waiting and abandons them), and ``KeyboardInterrupt`` is raised once
    it has ended (by ``run``: this returns ``_INTERRUPTED`` for it, so the traceback
    shows no frame of asyncio or of this function); a third is raised where it lands,
    as Python's own. Neither of the
    first two raises inside a body or the scheduler (asyncio.run's handler raises the
    second wherever the main thread is, so a body could swallow it and the run go on
    waiting). Outside the main thread, or under a SIGINT handler of the caller's,
    this is plain ``asyncio.run``."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        return asyncio.run(coro)
    interrupts, main = 0, None

    def on_sigint(signum, frame):
        nonlocal interrupts
        interrupts += 1
        if interrupts > 2 or main is None or main.task.done():
            raise KeyboardInterrupt
        main.request()

    async def guarded():
        nonlocal main
        main = _Cancels(asyncio.get_running_loop(), asyncio.current_task())
        return await coro

    signal.signal(signal.SIGINT, on_sigint)
    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        if interrupts:
            return _INTERRUPTED
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)


# ===========================================================================
# Views: what `cascade top`, `cascade serve` and engine.serve show
# ===========================================================================

class _View:
    """The one model behind the live views: the engines' records (_engine_record), read
    from the broker's presence records (``feed``, a subscription's callback) or from
    engines of this process (``engines``), turned by ``snapshot`` into what a view
    draws: engines, runs with progress, rate and ETA, per-task counts, what blocked tasks
    wait on, controls in force with time left and usage, shared controls, finished runs.
    Records from the broker are data from elsewhere: every field is checked and every
    text made printable here, so a renderer can trust what it gets."""

    RATE_WINDOW = 10.0  # seconds of samples a run's rate is measured over

    def __init__(self, engines=()):
        self.engines = list(engines)
        self.records = {}   # engine id -> its latest record
        self.samples = {}   # (engine id, run id) -> deque of (updated_at, done)
        self.lock = threading.Lock()
        self.version = 0    # bumped by every record taken (a view redraws on change)

    def feed(self, topic, payload):
        """A presence message: a record, or an empty one (the engine has gone)."""
        eid = topic.rsplit("/", 1)[-1]
        with self.lock:
            if isinstance(payload, dict):
                self.records[str(payload.get("engine_id", eid))] = payload
            else:
                self.records.pop(eid, None)
            self.version += 1

    def _read(self):
        for e in self.engines:
            rec = _engine_record(e, _source(), None, None, e.constraints[
                :_Presence.MAX_CONSTRAINTS], len(e._cp.constraints))
            with self.lock:
                self.records[e.id] = rec
                self.version += 1
        with self.lock:
            return list(self.records.values())

    def snapshot(self, now=None):
        """What the views draw, as one JSON-able dict."""
        now = time.time() if now is None else now
        text, num = _printable, _finite
        out = {"at": now, "engines": [], "runs": [], "blocked": [], "controls": [],
               "shared": [], "history": []}
        controls = {}
        live = set()
        for rec in sorted(self._read(), key=lambda r: str(r.get("engine_id"))):
            eid = text(rec.get("engine_id", "?"))
            at, beat = num(rec.get("updated_at")), num(rec.get("heartbeat"))
            lost = beat is not None and (at is None or now - at > _Presence.LOST * beat)
            runs = [r for r in _list(rec.get("runs")) if isinstance(r, dict)]
            out["engines"].append({
                "engine_id": eid, "source": text(rec.get("source", "")),
                "org": text(rec.get("org", "")), "project": text(rec.get("project", "")),
                "version": text(rec.get("version", "")), "lost": lost, "runs": len(runs),
                "ago": None if at is None else max(0.0, now - at),
                "controls": num(rec.get("constraints_total")) or 0,
                "trimmed": [text(t) for t in _list(rec.get("trimmed"))]})
            for r in runs:
                rid = text(r.get("run_id", "?"))
                live.add((eid, rid))
                done, total = num(r.get("done")) or 0, num(r.get("total")) or 0
                rate = self._rate(eid, rid, at if at is not None else now, done,
                                  num(r.get("started_at")))
                tasks = {text(k): _counts(v) for k, v in _items(r.get("tasks"))}
                out["runs"].append({
                    "engine_id": eid, "run_id": rid, "done": done, "total": total,
                    "rate": rate, "eta": (total - done) / rate if rate and total > done
                    else None, "counts": _counts(r.get("counts")), "tasks": tasks,
                    "elapsed": None if num(r.get("started_at")) is None
                    else max(0.0, now - r["started_at"])})
            for b in _list(rec.get("blocked")):
                if isinstance(b, dict):
                    out["blocked"].append({"engine_id": eid,
                                           "task": text(b.get("task_name", "?")),
                                           "waits_on": text(b.get("waits_on", "?")),
                                           "count": num(b.get("count")) or 0})
            for c in _list(rec.get("constraints")):
                if not isinstance(c, dict):
                    continue
                kind, params = c.get("type"), c.get("params")
                setting = (text(_CONTROL_TYPES[kind].setting(params))
                           if kind in _CONTROL_TYPES and isinstance(params, dict)
                           else text(params))
                left = num(c.get("expires_in"))
                if left is not None and at is not None:
                    left = max(0.0, left - max(0.0, now - at))
                k = (text(c.get("scope", "?")), text(kind), setting, text(c.get("origin", "")))
                row = controls.setdefault(k, {
                    "scope": k[0], "type": k[1], "setting": k[2], "origin": k[3],
                    "expires_in": left, "engines": [], "usage": {}, "busiest": {}})
                row["engines"].append(eid)
                if "usage" in c:
                    row["usage"][eid] = text(c["usage"])
                if isinstance(c.get("busiest"), dict):  # a per-key limit's busiest values
                    row["busiest"][eid] = _counts(c["busiest"])
            for c in _list(rec.get("shared")):
                if isinstance(c, dict):
                    out["shared"].append(dict({text(k): text(v) for k, v in c.items()},
                                              engine_id=eid))
            for h in _list(rec.get("history")):
                if isinstance(h, dict):
                    start, took = num(h.get("started_at")), num(h.get("duration"))
                    out["history"].append({
                        "engine_id": eid, "run_id": text(h.get("run_id", "?")),
                        "status": text(h.get("status", "?")), "duration": took,
                        "ended_at": _finite(start + took) if start is not None and took is
                        not None else None, "counts": _counts(h.get("counts")),
                        "error": None if h.get("error") is None else text(h["error"])})
        out["controls"] = sorted(controls.values(), key=lambda c: (c["scope"], c["type"]))
        out["history"].sort(key=lambda h: -(h["ended_at"] or 0))
        del out["history"][50:]
        with self.lock:  # runs that ended leave no samples behind
            for k in [k for k in self.samples if k not in live]:
                del self.samples[k]
        return out

    def _rate(self, eid, rid, at, done, started):
        """Units done per second over the last RATE_WINDOW seconds of records (since
        the run's start while there is one record only)."""
        with self.lock:
            q = self.samples.setdefault((eid, rid), collections.deque())
            if not q or q[-1][0] < at:
                q.append((at, done))
            while len(q) > 2 and at - q[1][0] >= self.RATE_WINDOW:
                q.popleft()
            t0, d0 = q[0]
        if at > t0:
            return _finite(max(0.0, (done - d0) / (at - t0)))
        if started is not None and at > started:
            return _finite(done / (at - started))
        return None


def _list(x):
    return x if isinstance(x, list) else []


def _items(x):
    return x.items() if isinstance(x, dict) else ()


def _finite(x):
    """``x`` if it is a finite number, else None (JSON off the wire may hold NaN and
    Infinity, which a view's arithmetic spreads and a browser's JSON.parse refuses)."""
    return x if _is_number(x) and math.isfinite(x) else None


def _counts(x):
    """{state: count} as sent: printable names, finite numbers only."""
    return {_printable(k): v for k, v in _items(x) if _finite(v) is not None}


async def _steer(target, verb, scope, n=None):
    """A control from a view: ``verb`` (pause, resume, limit, clear) on ``scope``, through
    an Engine (its own controls) or a Controller (the broker's); returns the line that
    confirms it. Bad input raises ConstraintError/ValueError, whose text says why."""
    if verb not in ("pause", "resume", "limit", "clear"):
        raise ValueError(f"{verb!r}: a view steers with pause, resume, limit or clear")
    if verb == "limit" and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"limit needs a whole number of tasks, 0 or more, got {n!r:.40}")
    got = getattr(target, verb)(scope, *([n] if verb == "limit" else []))
    if inspect.isawaitable(got):
        got = await got
    where = "on the broker" if isinstance(target, Controller) else "on this engine"
    if verb in ("resume", "clear") and not isinstance(target, Controller):
        # an engine lifts its own layer only: a control from the broker on the scope holds
        scope = _check_scope(scope)
        held = sorted({c.describe() for c in target.constraints if c.scope == scope and
                       c.origin == "broker" and (verb == "clear" or c.type == "pause")})
        if held:
            raise ValueError(f"{'; '.join(held)} came from the broker and holds (this view "
                             f"steers this engine's own controls"
                             f"{', which went' if got else ''}): lift it with "
                             f"cascade {verb} {scope}")
    if isinstance(got, Constraint) and verb in ("pause", "limit"):  # (resume returns
        return f"{got.describe()}, {where}"                          # the pause it lifted)
    return {"resume": f"resumed {scope}", "clear": f"cleared every control on {scope}"}.get(
        verb, verb) + f" {where}"


# ---------------------------------------------------------------------------
# The web view: engine.serve and cascade serve (one page, made here)
# ---------------------------------------------------------------------------

_PAGE_STYLE = r"""
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--mute:#667085;--line:#e3e6ec;--accent:#2f6fde;
--ok:#1f9d55;--warn:#c98400;--bad:#d64545;--run:#2f6fde;--chip:#eef1f6}
@media (prefers-color-scheme:dark){:root{--bg:#14171c;--card:#1c2027;--ink:#e6e9ef;--mute:#98a2b3;
--line:#2c323c;--chip:#262c35;--accent:#5b93f0;--run:#5b93f0}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--ink)}
header{display:flex;align-items:center;gap:14px;padding:10px 20px;background:var(--card);border-bottom:1px solid var(--line);position:sticky;top:0;z-index:2}
header h1{font-size:17px;margin:0}
#where,#stamp{color:var(--mute)}
#conn{width:10px;height:10px;border-radius:50%;background:var(--bad);display:inline-block}
#conn.up{background:var(--ok)}
main{padding:14px 20px;display:grid;gap:14px;max-width:1400px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px}
section h2{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:var(--mute);margin:0 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:middle}
td{overflow-wrap:anywhere}
th{font-weight:600;color:var(--mute);font-size:12px;white-space:nowrap}
tr:last-child td{border-bottom:0}
.empty{color:var(--mute);font-style:italic}
.run{border:1px solid var(--line);border-radius:6px;padding:8px 10px;margin-bottom:10px}
.run:last-child{margin-bottom:0}
.runhead{display:flex;gap:12px;align-items:baseline;flex-wrap:wrap}
.runhead b{font-size:15px}
.mute{color:var(--mute)}
.bar{height:10px;background:var(--chip);border-radius:5px;overflow:hidden;margin:6px 0}
.fill{height:100%;background:var(--ok);width:0;transition:width .3s}
.chip{display:inline-block;padding:0 7px;margin:1px 3px 1px 0;border-radius:9px;background:var(--chip);font-size:12px;white-space:nowrap}
.s-running{color:var(--run)}.s-blocked,.s-waiting{color:var(--warn)}.s-failed{color:var(--bad)}.s-done,.s-cached{color:var(--ok)}
.tag{font-size:11px;padding:0 6px;border-radius:4px;background:var(--warn);color:#fff;margin-left:6px}
button{font:inherit;font-size:12px;padding:2px 8px;border:1px solid var(--line);border-radius:4px;background:var(--chip);color:var(--ink);cursor:pointer}
button:hover{border-color:var(--accent)}
button.go{background:var(--accent);border-color:var(--accent);color:#fff}
td.acts{white-space:nowrap;width:1%}
td.num{text-align:right;font-variant-numeric:tabular-nums;width:1%;white-space:nowrap}
#bar2{display:flex;gap:10px;align-items:center;flex-wrap:wrap;padding:8px 20px;background:var(--card);border-bottom:1px solid var(--line)}
#confirm{display:none;gap:8px;align-items:center}
#confirm.on{display:flex}
#confirm input,#scope,#tokenin{font:inherit;padding:2px 6px;border:1px solid var(--line);border-radius:4px;background:var(--bg);color:var(--ink)}
#confirm input{width:70px}
#result{font-family:ui-monospace,monospace;font-size:13px}
#result.ok{color:var(--ok)}#result.err{color:var(--bad)}
#auth{display:none}#auth.on{display:block}
.lost{color:var(--bad)}
"""

_PAGE_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
// Every piece of data goes in as text: append(string) makes a text node, never markup.
function h(tag, cls, ...kids) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  for (const k of kids) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
let token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
let where = "", timers = [], pending = null;
const fmtS = (s) => s == null ? "-" : s < 60 ? s.toFixed(s < 10 ? 1 : 0) + "s" :
  s < 3600 ? Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s" :
  Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
const short = (id) => id.length > 26 ? id.slice(0, 25) + "\u2026" : id;
function chips(counts) {
  const span = h("span");
  for (const [k, n] of Object.entries(counts || {})) span.append(h("span", "chip s-" + k, k + " " + n));
  return span;
}
function table(head, rows) {
  if (!rows.length) return h("div", "empty", "none");
  const t = h("table"), tr = h("tr");
  for (const c of head) tr.append(h("th", null, c));
  t.append(tr);
  for (const r of rows) t.append(r);
  return t;
}
function row(...cells) {
  const tr = h("tr");
  for (const c of cells) tr.append(c instanceof HTMLTableCellElement ? c : h("td", null, c));
  return tr;
}
function button(verb, scope, label) {
  const b = h("button", null, label || verb);
  b.dataset.verb = verb; b.dataset.scope = scope;
  b.addEventListener("click", () => ask(verb, scope));
  return b;
}
function actions(scope) {
  const td = h("td", "acts");
  for (const v of ["pause", "resume", "limit", "clear"]) td.append(button(v, scope, v === "limit" ? "limit\u2026" : v), " ");
  return td;
}
function countdown(left) {
  const span = h("span", null, left == null ? "no expiry" : fmtS(left));
  if (left != null) timers.push({span, left, at: performance.now()});
  return span;
}
setInterval(() => {
  for (const t of timers) t.span.textContent = fmtS(Math.max(0, t.left - (performance.now() - t.at) / 1000));
}, 250);

function render(s) {
  where = s.where || "";
  $("where").textContent = s.where_long || "";
  $("stamp").textContent = "updated " + new Date(s.at * 1000).toLocaleTimeString();
  timers = [];
  const steered = {};
  for (const c of s.controls) (steered[c.scope] = steered[c.scope] || []).push(c.setting || c.type);
  const runs = h("div");
  for (const r of s.runs) {
    const card = h("div", "run");
    card.dataset.run = r.run_id;
    const pct = r.total ? Math.min(100, 100 * r.done / r.total) : 0;
    card.append(h("div", "runhead", h("b", null, r.run_id), h("span", "mute", "on " + short(r.engine_id)),
      h("span", "prog", r.done + " / " + r.total + " done"),
      h("span", null, r.rate == null ? "- /s" : r.rate.toFixed(r.rate < 10 ? 1 : 0) + "/s"),
      h("span", null, "ETA " + (r.eta == null ? "-" : fmtS(r.eta))),
      h("span", "mute", "running for " + fmtS(r.elapsed))));
    const bar = h("div", "bar"), fill = h("div", "fill");
    fill.style.width = pct.toFixed(1) + "%";
    bar.append(fill);
    card.append(bar);
    const rows = [];
    for (const [name, counts] of Object.entries(r.tasks)) {
      const scope = "task:" + name, label = h("td", null, name);
      for (const st of steered[scope] || []) label.append(h("span", "tag", st));
      const tr = row(label, h("td", null, chips(counts)), actions(scope));
      tr.dataset.task = name;
      rows.push(tr);
    }
    card.append(table(["task", "counts", "steer"], rows));
    runs.append(card);
  }
  $("runs").replaceChildren(s.runs.length ? runs : h("div", "empty", "no run is active"));
  $("blocked").replaceChildren(table(["task", "waits on", "count", "engine"], s.blocked.map((b) =>
    row(b.task, b.waits_on, h("td", "num", b.count), short(b.engine_id)))));
  $("controls").replaceChildren(table(["type", "scope", "setting", "time left", "usage", "origin", ""],
    s.controls.map((c) => {
      const use = h("td");
      for (const [e, u] of Object.entries(c.usage)) use.append(h("div", null, (c.engines.length > 1 ? short(e) + ": " : "") + u));
      const tr = row(c.type, c.scope, c.setting, h("td", "num", countdown(c.expires_in)), use, c.origin,
        h("td", "acts", button("clear", c.scope)));
      tr.dataset.scope = c.scope;
      return tr;
    })));
  $("shared").replaceChildren(table(["shared control", "engine"], s.shared.map((c) =>
    row(Object.entries(c).filter(([k]) => k !== "engine_id").map(([k, v]) => k + " " + v).join(", "), short(c.engine_id)))));
  $("engines").replaceChildren(table(["engine", "source", "org / project", "version", "runs", "controls", "state"],
    s.engines.map((e) => row(e.engine_id, e.source, e.org + " / " + e.project, e.version,
      h("td", "num", e.runs), h("td", "num", e.controls),
      h("td", e.lost ? "lost" : null, (e.lost ? "lost" : "up") + (e.ago == null ? "" : " (" + fmtS(e.ago) + " ago)"))))));
  $("history").replaceChildren(table(["run", "status", "took", "counts", "ended", "error"], s.history.map((r) =>
    row(r.run_id, h("td", "s-" + (r.status === "Succeeded" ? "done" : r.status === "Failed" ? "failed" : "skipped"), r.status),
      h("td", "num", fmtS(r.duration)), h("td", null, chips(r.counts)),
      r.ended_at == null ? "-" : new Date(r.ended_at * 1000).toLocaleTimeString(), r.error || ""))));
}

function ask(verb, scope) {
  pending = {verb, scope};
  const scopeIn = verb === "limit";
  $("ask").textContent = verb + " " + scope + " " + where + "?";
  $("n").style.display = scopeIn ? "" : "none";
  $("confirm").classList.add("on");
  (scopeIn ? $("n") : $("yes")).focus();
}
function say(text, ok) {
  const r = $("result");
  r.textContent = new Date().toLocaleTimeString() + "  " + text;
  r.className = ok ? "ok" : "err";
}
async function steer() {
  const p = pending;
  $("confirm").classList.remove("on");
  pending = null;
  if (!p) return;
  const body = {verb: p.verb, scope: p.scope};
  // the number as typed: Number("") is 0, a limit that stops the scope; the server
  // refuses anything but a whole number, and says so
  const typed = $("n").value.trim();
  if (p.verb === "limit") body.n = /^[0-9]+$/.test(typed) ? Number(typed) : typed;
  try {
    const r = await fetch("steer", {method: "POST", cache: "no-store",
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"}, body: JSON.stringify(body)});
    const got = await r.json();
    say(r.ok ? got.message : "refused (" + r.status + "): " + got.error, r.ok);
    if (r.status === 401 || r.status === 403) needToken();
  } catch (e) { say("no answer from the server: " + e, false); }
}
$("yes").addEventListener("click", steer);
$("no").addEventListener("click", () => { pending = null; $("confirm").classList.remove("on"); });
$("n").addEventListener("keydown", (e) => { if (e.key === "Enter") steer(); });
$("go").addEventListener("click", () => { const s = $("scope").value.trim(); if (s) ask($("verb").value, s); });

function needToken() { $("auth").classList.add("on"); }
$("tokenform").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("tokenin").value.trim();
  location.hash = "token=" + encodeURIComponent(token);
  $("auth").classList.remove("on");
  if (!streaming) stream();
});

let streaming = false;
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));
// Server-sent events read with fetch, so the token travels in a header, never in a URL.
async function stream() {
  streaming = true;
  while (true) {
    try {
      const r = await fetch("events", {cache: "no-store", headers: {"Authorization": "Bearer " + token}});
      if (r.status === 401 || r.status === 403) { $("conn").className = ""; needToken(); break; }
      if (!r.ok) throw new Error(r.status + " " + (await r.text()));
      $("conn").className = "up";
      const rd = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      while (true) {
        const {value, done} = await rd.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const data = buf.slice(0, i).split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
          buf = buf.slice(i + 2);
          if (data) render(JSON.parse(data));
        }
      }
    } catch (e) { say("live updates lost: " + e.message + " (retrying)", false); }
    $("conn").className = "";
    await sleep(1000);
  }
  streaming = false;
}
if (token) stream(); else needToken();
"""

_PAGE_BODY = r"""<header><span id="conn" title="live updates"></span><h1>Cascade</h1>
<span id="where"></span><span id="stamp"></span></header>
<div id="bar2"><span>steer a scope</span><select id="verb"><option>pause</option><option>resume</option>
<option>limit</option><option>clear</option></select><input id="scope" placeholder="global, task:NAME, tag:TAG" size="28">
<button id="go">steer</button><span id="confirm"><b id="ask"></b><input id="n" type="number" min="0" value="1">
<button id="yes" class="go">confirm</button><button id="no">cancel</button></span><span id="result"></span></div>
<main><section id="auth"><h2>token</h2><form id="tokenform">This view needs the token printed at start-up
(the URL it printed carries it after #token=): <input id="tokenin" size="40" autocomplete="off">
<button class="go">open</button></form></section>
<section><h2>runs</h2><div id="runs"><div class="empty">connecting&hellip;</div></div></section>
<section><h2>blocked: what waiting tasks wait on</h2><div id="blocked"></div></section>
<section><h2>controls in force</h2><div id="controls"></div></section>
<section><h2>shared controls (fleet)</h2><div id="shared"></div></section>
<section><h2>engines</h2><div id="engines"></div></section>
<section><h2>finished runs</h2><div id="history"></div></section></main>"""


def _page():
    """The web view's one page and its Content-Security-Policy: the inline style and
    script are allowed by their hashes, nothing else (no other origin, no inline
    handler, no frame), so even markup that slipped into the page could not run."""
    import base64
    import hashlib

    def sha(text):
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
    html = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>Cascade</title><style>{_PAGE_STYLE}</style></head><body>{_PAGE_BODY}"
            f"<script>{_PAGE_SCRIPT}</script></body></html>")
    csp = (f"default-src 'none'; script-src {sha(_PAGE_SCRIPT)}; style-src {sha(_PAGE_STYLE)}; "
           "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return html.encode(), csp


def _check_token(token, what="token"):
    if (not isinstance(token, str) or len(token) < 12 or not token.isascii()
            or not token.isprintable() or " " in token):
        raise ValueError(f"{what}: need at least 12 printable ASCII characters without "
                         "spaces (or none: a random one is made)")
    return token


class _WebView:
    """The web view (``engine.serve``, ``cascade serve``): a standard-library HTTP server
    on its own daemon threads serving one page, the snapshots of a _View as server-sent
    events, and the page's controls.

    Routes: ``GET /`` the page (no data in it, so no token); ``GET /events`` the
    snapshot as JSON on change and at least every ``refresh`` seconds (text/event-stream);
    ``GET /snapshot`` one snapshot; ``POST /steer`` ``{"verb", "scope", "n"}`` through
    ``steer(verb, scope, n)``, which returns the line that confirms it. Every route but
    the page needs ``Authorization: Bearer TOKEN`` (401 without it, 403 with a wrong one,
    nothing done): a header, never a URL, so the token is in no log, history or Referer,
    and a cross-site form or image cannot send it. The page reads the token from the URL
    fragment (``/#token=...``), which browsers never send."""

    MAX_CLIENTS = 16      # live pages at once; more get 503 (each holds a thread)
    MAX_BODY = 4096       # bytes of a /steer request
    KEEPALIVE = 15.0      # seconds between comments on an idle event stream

    def __init__(self, view, steer, *, host="127.0.0.1", port=0, token=None,
                 where="", where_long="", refresh=1.0):
        import http.server
        import ipaddress
        import secrets
        token = secrets.token_urlsafe(24) if token is None else _check_token(token)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port={port!r}: need 0 to 65535 (0 picks a free port)")
        self.view, self.steer, self.token = view, steer, token
        self.where, self.where_long, self.refresh = where, where_long, refresh
        self.page, self.csp = _page()
        self.cond = threading.Condition()
        self.frame, self.seq, self.clients = b"", 0, 0
        self.closed = False
        self._kick = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("_Server", (http.server.ThreadingHTTPServer,), {
            "address_family": family, "daemon_threads": True,
            "handle_error": lambda srv, request, address: _log.debug(
                "web view: request from %s failed", address, exc_info=True)})
        try:
            self.httpd = server_cls((host, port), _web_handler(http.server, self))
        except OSError as exc:
            raise OSError(f"cannot serve the web view on {host}:{port} ({exc}); choose "
                          "another port (--http-port, port=; 0 picks a free one) or "
                          "address (--bind, host=)") from None
        self.host, self.port = host, self.httpd.server_address[1]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            _log.warning("the web view listens on %s, beyond this machine: anyone who can "
                         "reach it can try the token, and plain HTTP carries the token in "
                         "clear; prefer 127.0.0.1 with an SSH tunnel, or TLS in front", host)
        self._threads = [threading.Thread(target=self.httpd.serve_forever, args=(0.1,),
                                          daemon=True, name="cascade-serve"),
                         threading.Thread(target=self._pump, daemon=True,
                                          name="cascade-serve-pump")]
        for t in self._threads:
            t.start()

    @property
    def url(self):
        """The address to open, with the token in its fragment (never sent to a server),
        quoted: the page reads it as a form value ("+" a space, "&" an end, "%xx" a
        byte), and a given token (base64: "+", "/", "=") may hold any of them."""
        import urllib.parse
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/#token={urllib.parse.quote(self.token, safe='')}"

    def _pump(self):
        """Makes the frame the event streams send: while someone watches, on a change
        of the view (a record from the broker) and at least every ``refresh`` seconds."""
        seen, sent = None, -math.inf
        while not self.closed:
            kicked = self._kick.wait(0.1)
            self._kick.clear()
            if self.closed or not self.clients:
                continue
            now = time.monotonic()
            changed = not self.view.engines and self.view.version != seen
            if not (kicked or changed or now - sent >= self.refresh):
                continue
            seen, sent = self.view.version, now
            try:
                frame = self.frame_of(self.view.snapshot())
            except Exception:  # a view that fails once is no reason to stop serving it
                _log.warning("the web view could not take a snapshot", exc_info=True)
                continue
            with self.cond:
                self.frame, self.seq = frame, self.seq + 1
                self.cond.notify_all()

    def frame_of(self, snap):
        snap = dict(snap, where=self.where, where_long=self.where_long)
        try:
            return json.dumps(snap, default=repr, allow_nan=False).encode()
        except ValueError:  # a NaN or infinity off the wire: JSON has none (the page's
            return json.dumps(_finite_json(snap), default=repr).encode()  # parser would fail)

    def close(self):
        """Stop serving: the event streams end, the port is closed. Idempotent."""
        if self.closed:
            return
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self._kick.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"{self.clients} live page(s)"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"<WebView http://{host}:{self.port}/ {self.where_long}, {state} (token hidden)>"


def _finite_json(x):
    """``x`` with every float that is not finite (NaN, infinities) made None, all
    through (see _finite)."""
    if isinstance(x, float):
        return _finite(x)
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


def _web_handler(http_server, web):
    """The request handler class of ``web`` (a _WebView)."""
    import hmac

    class Handler(http_server.BaseHTTPRequestHandler):
        server_version = "cascade-serve"
        sys_version = ""
        timeout = 60  # seconds a socket may stall (a page that stopped reading)

        def log_message(self, fmt, *args):  # paths only: the token is never in one
            _log.debug("web view: %s %s", self.address_string(), fmt % args)

        def _send(self, code, body, ctype="application/json", extra=()):
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
            self.send_response(code)
            for k, v in (("Content-Type", f"{ctype}; charset=utf-8"),
                         ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                         ("X-Content-Type-Options", "nosniff"),
                         ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"),
                         *extra):
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorized(self):
            got = self.headers.get("Authorization", "")
            if not got.startswith("Bearer "):
                self._send(401, {"error": "this needs the token printed at start-up, in the "
                                          "header Authorization: Bearer TOKEN"},
                           extra=(("WWW-Authenticate", "Bearer"),))
                return False
            if not hmac.compare_digest(got[7:].strip().encode(), web.token.encode()):
                self._send(403, {"error": "wrong token: use the one printed at start-up"})
                return False
            origin = self.headers.get("Origin")
            if origin and origin.split("://", 1)[-1] != self.headers.get("Host"):
                self._send(403, {"error": f"requests from {origin[:100]} are not taken "
                                          f"here ({str(self.headers.get('Host'))[:100]}); "
                                          "a proxy in front must pass the Host header on"})
                return False
            return True

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/":
                self._send(200, web.page, "text/html",
                           (("Content-Security-Policy", web.csp),))
            elif path == "/snapshot":
                if self._authorized():
                    self._send(200, web.frame_of(web.view.snapshot()))
            elif path == "/events":
                if self._authorized():
                    self._events()
            else:
                self._send(404, {"error": f"no {path[:100]!r} here: / is the page"})

        do_HEAD = do_GET

        def _events(self):
            with web.cond:
                if web.clients >= web.MAX_CLIENTS:
                    full = True
                else:
                    full = False
                    web.clients += 1
            if full:
                self._send(503, {"error": f"{web.MAX_CLIENTS} live pages are open already; "
                                          "close one"}, extra=(("Retry-After", "5"),))
                return
            try:
                self.send_response(200)
                for k, v in (("Content-Type", "text/event-stream; charset=utf-8"),
                             ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no"),
                             ("X-Content-Type-Options", "nosniff")):
                    self.send_header(k, v)
                self.end_headers()
                if self.command == "HEAD":
                    return
                web._kick.set()  # a fresh frame for the newcomer
                seq = 0
                while True:
                    with web.cond:
                        web.cond.wait_for(lambda: web.seq != seq or web.closed, web.KEEPALIVE)
                        if web.closed:
                            return
                        frame, fresh = web.frame, web.seq != seq
                        seq = web.seq
                    self.wfile.write(b"data: " + frame + b"\n\n" if fresh and frame
                                     else b": still here\n\n")
                    self.wfile.flush()
            except (OSError, ValueError):  # the page went away (or the server closed)
                self.close_connection = True
            finally:
                with web.cond:
                    web.clients -= 1

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            if path != "/steer":
                self._send(404, {"error": f"no {path[:100]!r} here: POST /steer steers"})
                return
            if not self._authorized():
                return
            if self.headers.get_content_type() != "application/json":
                self._send(415, {"error": "send JSON: Content-Type: application/json"})
                return
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                size = -1
            if not 0 <= size <= web.MAX_BODY:
                self._send(413 if size > 0 else 411,
                           {"error": f"need a Content-Length up to {web.MAX_BODY} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(size))
                if not isinstance(body, dict) or not isinstance(body.get("scope"), str):
                    raise ValueError('send {"verb": "pause", "scope": "task:NAME"} (and "n" '
                                     "for limit)")
                message = web.steer(body.get("verb"), body["scope"], body.get("n"))
            except (ValueError, TypeError, RecursionError) as exc:  # ConstraintError too
                self._send(400, {"error": str(exc) or type(exc).__name__})
            except Exception as exc:  # the broker did not keep it, or did not answer
                self._send(502, {"error": f"{type(exc).__name__}: {exc}"})
            else:
                web._kick.set()  # show its effect at once
                self._send(200, {"ok": True, "message": message})
    return Handler


# --- cascade top: the renderer (pure: a snapshot in, lines of text out) ------------

_TOP_STATES = ("running", "granted", "submitted", "blocked", "pending", "retrying", "done",
               "cached", "skipped", "failed")  # the order a task's counts are shown in

_TOP_KEYS = (("up/down, k/j", "select a task"),
             ("p", "pause the selected task (scope task:NAME) on the broker"),
             ("r", "resume it"),
             ("l", "limit it: type N, then Enter (Esc cancels)"),
             ("c", "clear every control on it"),
             ("", "each asks y/n on the bottom line first"),
             ("?", "this help (any key closes it)"),
             ("q, Ctrl-C", "quit"))


def _clip(text, width):
    """``text`` cut to ``width`` terminal cells (wide characters take two, combining
    ones none), so that a line never wraps nor overruns the window."""
    if width <= 0:
        return ""
    if text.isascii():
        return text[:width]
    import unicodedata
    used = 0
    for i, ch in enumerate(text):
        w = (0 if unicodedata.combining(ch) else
             2 if unicodedata.east_asian_width(ch) in "WF" else 1)
        if used + w > width:
            return text[:i]
        used += w
    return text


def _top_span(seconds):
    """A duration as a view shows it: 45s, 3m05s, 2h04m, 3d02h."""
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _top_count(n):
    return f"{n:,}" if isinstance(n, int) else f"{n:,.1f}"


def _top_tasks(snap):
    """The selectable rows of ``cascade top``: (engine id, run id, task name) of every
    task of every run, in the order drawn."""
    return [(r["engine_id"], r["run_id"], name) for r in snap["runs"]
            for name in sorted(r["tasks"])]


def _top_lines(snap, width, height, selected=0, bottom="", help=False):
    """``cascade top`` as ``height`` lines of at most ``width`` cells, from a
    ``_View.snapshot()``: a title line, then engines, runs (progress bar, done / total,
    rate, ETA) with their tasks (``selected``: the index, in _top_tasks, of the one
    marked with ``>``), what blocked tasks wait on, controls in force (time left, usage),
    shared controls and finished runs, scrolled to keep the selected task in sight; the
    last line is ``bottom`` (a prompt, a result, or the keys). A pure function: the
    curses loop only writes what it returns."""
    if width < 1 or height < 1:
        return []
    tasks = _top_tasks(snap)
    n_runs, n_cons = len(snap["runs"]), len(snap["controls"])
    title = (f"cascade top: {len(snap['engines'])} engine{'s' * (len(snap['engines']) != 1)}, "
             f"{n_runs} run{'s' * (n_runs != 1)}, {n_cons} control{'s' * (n_cons != 1)}"
             f"  {time.strftime('%H:%M:%S', time.gmtime(snap['at']))} UTC")
    body, mark = [], None  # mark: the body line of the selected task
    if help:
        body.append("KEYS")
        body += [f"  {k:<14}{what}" for k, what in _TOP_KEYS]
        body += ["", "Shows what the engines' presence records on the broker carry, sent",
                 "every heartbeat; a record too large for the broker lists less detail",
                 "('trimmed' on its engine's line says what)."]
    else:
        runs_of = collections.defaultdict(list)
        for r in snap["runs"]:
            runs_of[r["engine_id"]].append(r)
        if not snap["engines"]:
            body.append("no engine has a presence record under this prefix yet (engines "
                        "publish one with a connector: Engine(connector=..., presence=5))")
        i = 0
        for e in snap["engines"]:
            state = ("LOST (last heard " + _top_span(e["ago"]) + " ago)" if e["lost"]
                     else "up")
            body.append(f"ENGINE {e['engine_id']}  {e['org']}/{e['project']}  "
                        f"v{e['version']}  {state}  {e['runs']} run{'s' * (e['runs'] != 1)}"
                        f", {e['controls']} control{'s' * (e['controls'] != 1)}"
                        + (f"  [trimmed: {', '.join(e['trimmed'])}]" if e["trimmed"] else ""))
            for r in runs_of.get(e["engine_id"], ()):
                done, total = r["done"], r["total"]
                frac = done / total if total else 0.0
                bar_w = max(5, min(40, width // 4))
                fill = int(frac * bar_w)
                rate = "-" if r["rate"] is None else f"{r['rate']:,.1f}/s"
                body.append(f"  RUN {r['run_id']}  [{'#' * fill}{'.' * (bar_w - fill)}] "
                            f"{_top_count(done)}/{_top_count(total)} {frac:4.0%}  {rate}"
                            f"  ETA {_top_span(r['eta'])}  elapsed {_top_span(r['elapsed'])}")
                names = sorted(r["tasks"])
                name_w = min(28, max([len(n) for n in names] + [4]))
                for name in names:
                    counts = r["tasks"][name]
                    order = [k for k in _TOP_STATES if k in counts] + sorted(
                        k for k in counts if k not in _TOP_STATES)
                    if i == selected:
                        mark = len(body)
                    body.append(f"  {'>' if i == selected else ' '} {name:<{name_w}}  "
                                + "  ".join(f"{k} {_top_count(counts[k])}" for k in order))
                    i += 1
        def on(eid):  # which engine, where there are several
            return f"  ({eid})" if len(snap["engines"]) > 1 else ""
        if snap["blocked"]:
            body.append("WAITING ON")
            for b in snap["blocked"]:
                body.append(f"  {_top_count(b['count']):>9} {b['task']}  waits on "
                            f"{b['waits_on']}{on(b['engine_id'])}")
        if snap["controls"]:
            body.append("CONTROLS IN FORCE")
            for c in snap["controls"]:
                left = ("no expiry" if c["expires_in"] is None
                        else f"{_top_span(c['expires_in'])} left")
                use = c["usage"]
                used = ("; ".join(use.values()) if len(use) == 1 else "; ".join(
                    f"{k}: {v}" for k, v in use.items()))
                busy = {}
                for per in c["busiest"].values():
                    for v, n in per.items():
                        busy[v] = busy.get(v, 0) + n
                body.append(f"  {c['scope']:<20} {c['setting'] or c['type']:<20} "
                            f"{c['origin']:<6} {left:<11} {used}")
                if busy:
                    body.append("      busiest: " + ", ".join(
                        f"{v} {_top_count(n)}" for v, n in sorted(
                            busy.items(), key=lambda kv: (-kv[1], kv[0]))[:5]))
        if snap["shared"]:
            body.append("SHARED ACROSS THE FLEET")
            for c in snap["shared"]:
                rest = "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.items()
                                 if k not in ("type", "scope", "engine_id"))
                body.append(f"  {c.get('type', '?'):<11} {c.get('scope', '?'):<20} {rest}"
                            f"  ({c['engine_id']})")
        if snap["history"]:
            body.append("FINISHED RUNS")
            for h in snap["history"][:10]:
                counts = ", ".join(f"{k} {_top_count(v)}" for k, v in h["counts"].items())
                took = "-" if h["duration"] is None else f"{h['duration']:.1f}s"
                body.append(f"  {h['run_id']:<24} {h['status']:<10} {took:>8}  {counts}"
                            + (f"  {h['error']}" if h["error"] else "") + on(h["engine_id"]))
    if not bottom:
        bottom = ("p pause  r resume  l limit  c clear  on the selected task   ? help  q quit"
                  if tasks else "? help  q quit")
    room = height - 2  # the title and the bottom line
    if height == 1:
        return [_clip(bottom, width)]
    top = 0
    if mark is not None and room > 0 and mark >= room:
        top = mark - room + 1
    lines = [title] + body[top:top + max(0, room)]
    lines += [""] * (height - 1 - len(lines)) + [bottom]
    return [_clip(line, width) for line in lines]


# ===========================================================================
# Drawing the graph: DOT, Mermaid, and an SVG laid out here (no Graphviz)
# ===========================================================================
#
# One model, three outputs: _graph_view takes the nodes the run would build
# (_build_graph, so a drawing shows exactly what runs) and makes boxes: one per call,
# one per map (a map is one node, whatever its size), and with collapsing, one per group
# of identical parallel calls (same task, same inputs and same dependants, as groups:
# the 1,000 fetch -> parse chains of a per-item pipeline are drawn as two boxes).
# Edges go from a dependency to its dependant. The SVG layout (_layout) is a simplified
# Sugiyama: layer = longest path from the sources, long edges routed through dummy
# points, order within a layer by the barycentre of the neighbours (4 sweeps), then x
# by three passes of "as near the neighbours' mean as the boxes' order allows".

_DRAW_STATES = ("pending", "waiting", "running", "done", "cached", "skipped", "failed")
# fill, stroke of a box (None: a drawing without states)
_STATE_COLOURS = {
    None: ("#f7f9fc", "#4a5568"),
    "pending": ("#eceff3", "#8a94a6"),
    "waiting": ("#ffe7a3", "#b7791f"),
    "running": ("#a8d1ff", "#2b6cb0"),
    "done": ("#b9e4b4", "#2f855a"),
    "cached": ("#b2e0dc", "#287d76"),
    "skipped": ("#f4f4f4", "#9aa0a6"),   # and a dashed border
    "failed": ("#f6a5a5", "#c53030"),
}
_COLLAPSE_ABOVE = 50    # collapse=None: a graph of more calls has its identical ones grouped
_MAX_DRAWN = 5000       # boxes an SVG draws at most (see _graph_view)
_MAX_LABEL = 40         # characters of a name drawn; longer ones end in an ellipsis
_GRAPH_FORMATS = {".svg": "svg", ".dot": "dot", ".gv": "dot", ".mmd": "mermaid",
                  ".mermaid": "mermaid"}


class _Box:
    """One drawn node: a call, a map, a Param/Env, or a group of identical calls."""
    __slots__ = ("name", "kind", "count", "size", "state", "done", "tip")

    def __init__(self, name, kind, count, size):
        self.name, self.kind, self.count, self.size = name, kind, count, size
        self.state = None      # the drawn state (see _box_state), None without states
        self.done = None       # (items done, items) of a map or a group, when states given
        self.tip = ""          # the tooltip: ids, what it is, its state

    @property
    def label(self):
        name = self.name if len(self.name) <= _MAX_LABEL else self.name[:_MAX_LABEL - 1] + "…"
        n = self.size if self.kind == "map" else self.count if self.count > 1 else None
        if self.kind == "map" and n is None:
            return f"{name} ×?"  # a map over a lazy result: its size is known when it runs
        return name if n is None else f"{name} ×{n:,}"

    @property
    def note(self):
        """The second line: progress of a map or group while states are drawn."""
        if self.done is None or (self.kind != "map" and self.count == 1):
            return ""
        d, t = self.done
        return f"{d:,}/{t:,} done" if t is not None else f"{d:,} done"


def _graph_view(target, states=None, collapse=None):
    """(boxes, edges) of ``target``'s graph: edges are (dependency box, dependant box)
    index pairs, boxes in a topological order. ``states``: {lazy result: (state, items
    done, items)} (see _draw_states). ``collapse``: True groups identical parallel calls
    into one box, False never, None when the graph has more than _COLLAPSE_ABOVE nodes."""
    target = _as_target(target)
    nodes = _build_graph(target, {}, {})[0]  # the run's own walk: ids and all
    order = [n for n in sorted(nodes.values(), key=_node_order) if type(n.lazy) is not _Gather]
    index = {n.lazy: i for i, n in enumerate(order)}  # creation order is topological
    n = len(order)
    parents = [[] for _ in range(n)]
    children = [[] for _ in range(n)]
    for i, node in enumerate(order):
        for d in dict.fromkeys(node.lazy.deps):
            j = index.get(d)
            if j is not None:  # (None: the gather of a list target, never drawn)
                parents[i].append(j)
                children[j].append(i)
    lengths = {}  # known map sizes, inner maps first (creation order)
    kinds = []
    for node in order:
        lz = node.lazy
        if type(lz) is MappedLazyResult:
            lengths[lz] = _known_length(lz, lengths)
            kinds.append("map")
        else:
            kinds.append("call" if lz.task is not None else "param")
    if collapse is None:
        collapse = n > _COLLAPSE_ABOVE
    if collapse:
        group = _collapse(order, kinds, parents, children)
    else:
        group = list(range(n))
    # boxes in order of their first member; quotient edges deduplicated
    first, members = {}, []
    for i, g in enumerate(group):
        b = first.get(g)
        if b is None:
            b = first[g] = len(members)
            members.append([])
        members[b].append(i)
    box_of = [first[g] for g in group]
    edges = list(dict.fromkeys((box_of[j], box_of[i]) for i in range(n) for j in parents[i]))
    boxes = []
    for ms in members:
        node = order[ms[0]]
        lz, kind = node.lazy, kinds[ms[0]]
        box = _Box(lz.name, kind, len(ms), lengths.get(lz))
        ids = [order[i].id for i in ms]
        what = (f"map of {box.size:,} items" if kind == "map" and box.size is not None else
                "map (its size is known when it runs)" if kind == "map" else
                f"{len(ms):,} identical calls" if len(ms) > 1 else "")
        if states is not None:
            _box_state(box, [states.get(order[i].lazy) for i in ms])
        box.tip = ", ".join(ids[:3]) + (f" ... {ids[-1]}" if len(ids) > 3 else "") + \
            (f": {what}" if what else "") + (f" ({box.state})" if box.state else "")
        boxes.append(box)
    return boxes, edges


def _collapse(order, kinds, parents, children):
    """A group number per node: calls of one task whose inputs and dependants are the
    same groups share one (maps and params never share). Partition refinement, a pass
    down and a pass up per round until no group splits: O(rounds x (nodes + edges)).
    The groups' graph is acyclic: within a pass a group's members have the same parent
    groups, so an edge between two of them would need an earlier member."""
    group = [("call", order[i].lazy.name) if k == "call" else ("own", i)
             for i, k in enumerate(kinds)]
    n, count = len(order), -1
    for _ in range(16):  # (a bound; it settles in two or three rounds in practice)
        down, sig = [0] * n, {}
        for i in range(n):
            down[i] = sig.setdefault((group[i], frozenset([down[p] for p in parents[i]])),
                                     len(sig))
        up, sig = [0] * n, {}
        for i in range(n - 1, -1, -1):
            up[i] = sig.setdefault((down[i], frozenset([up[c] for c in children[i]])), len(sig))
        group = up
        if len(sig) == count:
            break
        count = len(sig)
    return group


def _box_state(box, states):
    """A box's state from its members' (state, items done, items): one state if they
    agree, else the most telling one present (a failure first, then work under way)."""
    got = collections.Counter(s[0] if s else "pending" for s in states)
    if len(got) == 1:
        box.state = next(iter(got))
    else:
        box.state = next(s for s in ("failed", "running", "waiting", "pending", "done",
                                     "cached", "skipped") if s in got)
    if box.kind == "map":
        s = states[0]
        box.done = (s[1], s[2] if s[2] is not None else box.size) if s else (0, box.size)
        if box.size is None and s and s[2] is not None:
            box.size = s[2]  # known once it ran
    else:
        box.done = (got["done"] + got["cached"], len(states))


def _draw_states(run):
    """{lazy result: (state, items done, items)} of each node of ``run`` now (a snapshot
    from any thread: the run may be a few transitions ahead). States: pending (inputs
    not ready, or never ran), waiting (ready: waiting for admission or a retry),
    running, done, cached, skipped, failed."""
    held = {}  # node -> a unit of it holds a grant (running, or about to)
    for u in run.cp.holders_of(run):
        held[u.node] = True
    failed = run.failed_id
    over = run.stopping
    out = {}
    for _ in range(3):  # (the run's loop may add nodes meanwhile: a returned graph)
        try:
            items = list(run.nodes.items())
            break
        except RuntimeError:
            continue
    else:
        items = []
    for lz, node in items:
        total = done = None
        if type(lz) is MappedLazyResult:
            if type(node.value) is list:  # expanded: its size is known
                total = len(node.value)
                done = total - node.left if node.pending != -1 else total
        if failed is not None and (failed == node.id or failed.startswith(node.id + "[")):
            state = "failed"
        elif node.pending == -1:
            hits = run.cached.get(node, 0)
            state = ("skipped" if node.skip is not None else
                     "cached" if hits and hits >= (total or 1) else "done")
        elif node.pending > 0 or over or lz.task is None:
            state = "pending"
        else:
            state = "running" if node in held else "waiting"
        out[lz] = (state, done, total)
    return out


def _esc_xml(text):
    # XML 1.0 has no place for control characters at all: they are shown escaped
    return (_printable(text).replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&quot;").replace("'", "&#39;"))


def _esc_dot(text):
    # a double-quoted DOT string: only \ and " are special (and line ends)
    return _printable(text).replace("\\", "\\\\").replace('"', '\\"')


def _esc_mermaid(text):
    # Mermaid reads entity codes (#35;) in a quoted label; everything that could end
    # the label or be taken as markup is written as one
    return "".join(c if c.isalnum() and c.isascii() or c in " _-.,:/()" else f"#{ord(c)};"
                   for c in _printable(text))


def _to_dot(boxes, edges, title="cascade"):
    lines = [f'digraph "{_esc_dot(title)}" {{', "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="sans-serif", '
             f'fillcolor="{_STATE_COLOURS[None][0]}"];']
    for i, b in enumerate(boxes):
        attrs = [f'label="{_esc_dot(b.label)}' + (f'\\n{_esc_dot(b.note)}"' if b.note else '"')]
        if b.kind == "map" or b.count > 1:
            attrs.append("peripheries=2")
        elif b.kind == "param":
            attrs.append("shape=ellipse")
        if b.state is not None:
            fill, stroke = _STATE_COLOURS[b.state]
            style = "rounded,filled,dashed" if b.state == "skipped" else "rounded,filled"
            attrs.append(f'fillcolor="{fill}", color="{stroke}", style="{style}"')
        attrs.append(f'tooltip="{_esc_dot(b.tip)}"')
        lines.append(f"  n{i} [{', '.join(attrs)}];")
    lines.extend(f"  n{a} -> n{b};" for a, b in edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _to_mermaid(boxes, edges):
    lines = ["flowchart TD"]
    for i, b in enumerate(boxes):
        text = _esc_mermaid(b.label) + (f"<br/>{_esc_mermaid(b.note)}" if b.note else "")
        shape = ('[["', '"]]') if b.kind == "map" or b.count > 1 else \
            ('(["', '"])') if b.kind == "param" else ('["', '"]')
        lines.append(f"  n{i}{shape[0]}{text}{shape[1]}")
    lines.extend(f"  n{a} --> n{b}" for a, b in edges)
    used = list(dict.fromkeys(b.state for b in boxes if b.state is not None))
    for s in used:
        fill, stroke = _STATE_COLOURS[s]
        dash = ",stroke-dasharray:4 3" if s == "skipped" else ""
        lines.append(f"  classDef {s} fill:{fill},stroke:{stroke}{dash}")
        lines.append(f"  class {','.join(f'n{i}' for i, b in enumerate(boxes) if b.state == s)} {s}")
    return "\n".join(lines) + "\n"


# -- the layered layout --------------------------------------------------------------
_CHAR_W, _BOX_H, _LINE_H, _GAP_X, _GAP_Y, _MARGIN = 7.2, 30.0, 14.0, 24.0, 46.0, 16.0


def _box_width(b):
    return max(56.0, _CHAR_W * max(len(b.label), len(b.note)) + 22.0)


def _layout(widths, edges, sweeps=4):
    """Positions of boxes of ``widths`` joined by ``edges`` (a DAG): returns (x of each
    box's left side, its layer, and per edge the x of each layer it crosses). Layers by
    longest path from the sources (every edge points down); a long edge gets a dummy
    point on each layer it crosses (up to a budget of 4 per box: beyond it edges go
    straight); order within a layer by the barycentre of the neighbours on the layer
    above, then below, ``sweeps`` times; x by the mean of the neighbours' centres,
    pushed apart in the layer's order (no two boxes overlap). Cost: O(sweeps x (V + D
    + E) log V) for V boxes, E edges and D <= 4V dummies."""
    n = len(widths)
    children = [[] for _ in range(n)]
    indeg = [0] * n
    for a, b in edges:
        children[a].append(b)
        indeg[b] += 1
    layer = [0] * n
    queue = [i for i in range(n) if not indeg[i]]
    for i in queue:  # Kahn's order: longest path from a source
        for c in children[i]:
            if layer[c] < layer[i] + 1:
                layer[c] = layer[i] + 1
            indeg[c] -= 1
            if not indeg[c]:
                queue.append(c)
    # vertices: the boxes, then dummies; up/down: neighbours on the next layer up/down
    w = [float(x) for x in widths]
    lay = list(layer)
    up = [[] for _ in range(n)]
    down = [[] for _ in range(n)]
    chains = []
    budget = 4 * n
    for a, b in edges:
        chain = [a]
        if layer[b] - layer[a] - 1 <= budget:
            for L in range(layer[a] + 1, layer[b]):
                budget -= 1
                chain.append(len(w))
                w.append(8.0)
                lay.append(L)
                up.append([])
                down.append([])
        chain.append(b)
        for u, v in zip(chain, chain[1:]):
            if lay[v] == lay[u] + 1:  # (a straight long edge takes no part in ordering)
                down[u].append(v)
                up[v].append(u)
        chains.append(chain)
    depth = max(lay, default=-1) + 1
    rows = [[] for _ in range(depth)]
    for v in range(len(w)):  # boxes in topological order, then dummies
        rows[lay[v]].append(v)
    pos = [0.0] * len(w)
    for row in rows:
        for k, v in enumerate(row):
            pos[v] = float(k)

    def sort(row, nbrs):
        keyed = [(sum(pos[u] for u in nbrs[v]) / len(nbrs[v]) if nbrs[v] else pos[v], v)
                 for v in row]
        keyed.sort(key=lambda t: t[0])
        row[:] = [v for _, v in keyed]
        for k, v in enumerate(row):
            pos[v] = float(k)
    for _ in range(sweeps):
        for row in rows[1:]:
            sort(row, up)
        for row in reversed(rows[:-1]):
            sort(row, down)
    for row in rows[1:]:
        sort(row, up)
    # x: centres near the neighbours' mean, in the row's order, pushed apart
    cx = [0.0] * len(w)
    for row in rows:
        x = 0.0
        for v in row:
            cx[v] = x + w[v] / 2
            x += w[v] + _GAP_X

    def place(row, nbrs):
        want = [sum(cx[u] for u in nbrs[v]) / len(nbrs[v]) if nbrs[v] else cx[v] for v in row]
        k = len(row)
        left, edge = [0.0] * k, -math.inf
        for j, v in enumerate(row):  # pushed right: each clear of the one before
            left[j] = max(want[j] - w[v] / 2, edge + _GAP_X)
            edge = left[j] + w[v]
        right, edge = [0.0] * k, math.inf
        for j in range(k - 1, -1, -1):  # pushed left: each clear of the one after
            v = row[j]
            right[j] = min(want[j] - w[v] / 2, edge - _GAP_X - w[v])
            edge = right[j]
        # invariant: both keep every gap >= _GAP_X, so their mean does too
        for j, v in enumerate(row):
            cx[v] = (left[j] + right[j]) / 2 + w[v] / 2
    for row in rows[1:]:
        place(row, up)
    for row in reversed(rows[:-1]):
        place(row, down)
    for row in rows[1:]:
        place(row, up)
    low = min((cx[v] - w[v] / 2 for v in range(len(w))), default=0.0)
    xs = [cx[v] - w[v] / 2 - low for v in range(n)]
    routes = [[cx[v] - low for v in chain[1:-1]] for chain in chains]
    return xs, layer, routes


def _route_path(pts):
    """An edge's path: a curve down to each crossing's top, a straight line through its
    layer, and a curve to the dependant's top (y never goes back up)."""
    d = [f"M {pts[0][0]:.1f} {pts[0][1]:.1f}"]
    for k in range(0, len(pts) - 1, 2):
        (px, py), (qx, qy) = pts[k], pts[k + 1]
        if k:
            d.append(f"L {px:.1f} {py:.1f}")
        m = (py + qy) / 2
        d.append(f"C {px:.1f} {m:.1f} {qx:.1f} {m:.1f} {qx:.1f} {qy:.1f}")
    return " ".join(d)


def _to_svg(boxes, edges, states=False):
    """The drawing as an SVG document (presentation attributes only: no style sheet,
    font or other resource to fetch; a generic font family)."""
    if len(boxes) > _MAX_DRAWN:
        raise ValueError(f"the graph has {len(boxes):,} nodes to draw, more than the "
                         f"{_MAX_DRAWN:,} an SVG draws; draw it with collapse=True (identical "
                         "parallel calls as one box), or write DOT (flow.to_dot()) for "
                         "Graphviz")
    ports = [1] * len(boxes)  # room along a box for the edges that end or start there
    for a, b in edges:
        ports[a] += 1
        ports[b] += 1
    widths = [max(_box_width(b), min(12.0 * k, 320.0)) for b, k in zip(boxes, ports)]
    xs, layer, routes = _layout(widths, edges)
    two = any(b.note for b in boxes)
    h = _BOX_H + (_LINE_H if two else 0)
    present = [s for s in _DRAW_STATES if any(b.state == s for b in boxes)] if states else []
    top = _MARGIN + (30.0 if present else 0.0)
    ys = [top + L * (h + _GAP_Y) for L in layer]
    width = max([x + wd for x, wd in zip(xs, widths)] + [0.0]) + 2 * _MARGIN + 4
    legend_w = sum(_CHAR_W * len(s) + 34 for s in present) + 2 * _MARGIN
    width = max(width, legend_w, 120.0)
    height = (max(ys) + h if ys else top) + _MARGIN + 4
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
           f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
           'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
           'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
           '<path d="M 0 0 L 10 5 L 0 10 z" fill="#4a5568"/></marker></defs>',
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>']
    x = _MARGIN
    for s in present:  # the legend: the states drawn
        fill, stroke = _STATE_COLOURS[s]
        dash = ' stroke-dasharray="4 3"' if s == "skipped" else ""
        out.append(f'<g class="legend"><rect x="{x:.0f}" y="{_MARGIN:.0f}" width="16" '
                   f'height="14" rx="3" fill="{fill}" stroke="{stroke}"{dash}/>'
                   f'<text x="{x + 22:.0f}" y="{_MARGIN + 11:.0f}">{s}</text></g>')
        x += _CHAR_W * len(s) + 34
    off = _MARGIN
    # ports: the edges leaving a box spread along its bottom, those entering along its
    # top, each in the order of where its other end lies (fewer crossings at the box)
    cx = [off + x + wd / 2 for x, wd in zip(xs, widths)]
    ends = [(cx[a] if not r else off + r[-1], cx[b] if not r else off + r[0])
            for (a, b), r in zip(edges, routes)]
    port_out, port_in = {}, {}
    for side, key, port in ((0, 1, port_out), (1, 0, port_in)):
        by_box = collections.defaultdict(list)
        for e, ab in enumerate(edges):
            by_box[ab[side]].append(e)
        for v, es in by_box.items():
            es.sort(key=lambda e: ends[e][key])
            k = len(es)
            for j, e in enumerate(es):
                port[e] = off + xs[v] + widths[v] * (0.5 if k == 1 else 0.15 + 0.7 * j / (k - 1))
    for e, ((a, b), route) in enumerate(zip(edges, routes)):
        x0, y0 = port_out[e], ys[a] + h
        pts = [(x0, y0)]
        for k, rx in enumerate(route):  # through the band of each layer crossed
            yl = ys[a] + (k + 1) * (h + _GAP_Y)
            pts += [(off + rx, yl), (off + rx, yl + h)]
        pts.append((port_in[e], ys[b]))
        path = _route_path(pts)
        out.append(f'<path class="edge" data-from="n{a}" data-to="n{b}" d="{path}" '
                   'fill="none" stroke="#4a5568" stroke-width="1.2" marker-end="url(#arrow)"/>')
    for i, b in enumerate(boxes):
        fill, stroke = _STATE_COLOURS[b.state]
        x, y, wd = off + xs[i], ys[i], widths[i]
        dash = ' stroke-dasharray="4 3"' if b.state == "skipped" else ""
        rx = h / 2 if b.kind == "param" else 6
        g = [f'<g class="node" id="n{i}"><title>{_esc_xml(b.tip)}</title>']
        if b.kind == "map" or b.count > 1:  # stacked: many executions
            g.append(f'<rect x="{x + 3:.1f}" y="{y + 3:.1f}" width="{wd:.1f}" height="{h:.1f}" '
                     f'rx="{rx}" fill="{fill}" stroke="{stroke}"{dash}/>')
        g.append(f'<rect class="box" x="{x:.1f}" y="{y:.1f}" width="{wd:.1f}" '
                 f'height="{h:.1f}" rx="{rx}" fill="{fill}" stroke="{stroke}" '
                 f'stroke-width="1.4"{dash}/>')
        ty = y + h / 2 + 4 - (_LINE_H / 2 if b.note else 0)
        g.append(f'<text x="{x + wd / 2:.1f}" y="{ty:.1f}" text-anchor="middle" '
                 f'fill="#1a202c">{_esc_xml(b.label)}</text>')
        if b.note:
            g.append(f'<text x="{x + wd / 2:.1f}" y="{ty + _LINE_H:.1f}" text-anchor="middle" '
                     f'font-size="10.5" fill="#4a5568">{_esc_xml(b.note)}</text>')
        g.append("</g>")
        out.append("".join(g))
    out.append("</svg>")
    return "\n".join(out) + "\n"


class _Drawing:
    """A graph to draw: what ``handle.graph()`` returns (the run's graph with each
    node's state when it was asked for) and what ``flow.to_svg()`` and friends draw
    (no states). Shown inline in a notebook (``_repr_svg_``)."""

    def __init__(self, target, states=None, collapse=None, title="cascade"):
        self.target = _as_target(target)
        self.states, self.collapse, self.title = states, collapse, title

    def _view(self):
        return _graph_view(self.target, self.states, self.collapse)

    def to_dot(self) -> str:
        """Graphviz DOT text (``dot -Tpng``): one node per call or map, coloured by
        state if the drawing has states."""
        return _to_dot(*self._view(), title=self.title)

    def to_mermaid(self) -> str:
        """Mermaid flowchart text (GitHub renders it in a ```mermaid block)."""
        return _to_mermaid(*self._view())

    def to_svg(self) -> str:
        """An SVG document laid out here: layers top-down, edges pointing down, a
        legend of the states drawn."""
        return _to_svg(*self._view(), states=self.states is not None)

    def _repr_svg_(self):
        try:
            return self.to_svg()
        except ValueError:  # too big to draw: the notebook shows the text repr
            return None

    def __repr__(self):
        if self.states is None:
            return f"<graph of {self.target!r}>"
        got = collections.Counter(s[0] for s in self.states.values())
        shown = ", ".join(f"{k} {got[k]}" for k in _DRAW_STATES if got[k])
        return f"<graph of {self.title}: {shown or 'not started'}>"


def _drawing_of(flow, collapse, call):
    if isinstance(flow, _Drawing):
        return flow
    if isinstance(flow, RunHandle):
        return flow.graph(collapse=collapse)
    if type(flow) is Task or type(flow) is _BoundTask:
        raise _task_not_called(flow)
    if not isinstance(flow, LazyResult) and type(flow) not in (list, tuple, dict):
        raise TypeError(f"{call} draws a lazy result (call a @cs.task function to get one), "
                        "a list/tuple/dict of them, or a RunHandle (engine.start(...)), got "
                        f"{type(flow).__name__}")
    return _Drawing(flow, None, collapse)


def visualize(flow: Any, path: Union[str, os.PathLike], *, collapse: Optional[bool] = None) -> None:
    """Write a drawing of ``flow``'s graph to ``path``, in the format its extension
    names: ``.svg`` (laid out here, no Graphviz needed), ``.dot``/``.gv`` (Graphviz) or
    ``.mmd``/``.mermaid``. ``flow``: a lazy result, a list/tuple/dict of them, or a
    ``RunHandle`` (then coloured by each node's state now: during or after the run).
    ``collapse``: draw identical parallel calls (same task, same inputs and dependants)
    as one box ``name ×n``; None (the default) does so for graphs of more than 50
    calls. A map is always one box, with its size when known."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = _GRAPH_FORMATS.get(ext)
    if fmt is None:
        raise ValueError(f"visualize(flow, {os.fspath(path)!r}): cannot tell the format from "
                         f"{repr(ext) if ext else 'a path without an extension'}; end the path "
                         "in .svg, .dot (or .gv) or .mmd (or .mermaid)")
    text = getattr(_drawing_of(flow, collapse, "visualize()"), f"to_{fmt}")()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ===========================================================================
# CLI: cascade pause|resume|limit|rate|clear|status|watch|top|serve|demo|graph
# ===========================================================================

_CLI_HELP = f"""\
Steer Cascade workflows, from anywhere that reaches their MQTT broker.

Controls are published as retained messages, so every engine on the broker applies
them at once, and engines that start later apply them before their first task. Each
verb reads its control back: exit status 0 means the broker holds it, 1 that it does
not (an ACL that refuses this user, most often), said in one line.
Scopes: global, task:<name> (globs: task:fetch_*), tag:<tag>, run:<run_id>,
project:<id>.

examples:
  cascade demo                          see the control plane at work (no broker needed)
  cascade pause task:api_call --ttl 60  no new api_call starts for a minute
  cascade resume task:api_call
  cascade resume task:api_call --ramp 10/s   ... the waiting calls start 10 a second
  cascade limit tag:io 5                at most 5 io tasks at once
  cascade limit task:sync 2 --per customer --override acme=10
                                        ... 2 at once for each customer (10 for acme)
  cascade limit task:sync 10 --fair customer   round robin across customers
  cascade cancel tag:reports            once: tasks not finished end skipped
  cascade rate task:fetch 10/s --burst 5
  cascade rate tag:openai 60/m 10000/d  windows that each hold: a daily quota too
  cascade drain global                  before maintenance: new runs hold, started ones finish
  cascade clear task:fetch              remove every control on task:fetch
  cascade status                        what is in force, with time left
  cascade watch                         live task events of every run
  cascade watch --project etl           ... of one project's runs (--org, --run too)
  cascade top                           a live view of every engine; p pauses a task
  cascade serve                         a live web view with controls (prints its URL)
  cascade graph pipeline:flow -o flow.svg   draw a workflow (--format dot|mermaid prints)

The MQTT verbs need paho-mqtt: pip install '{_DIST}[mqtt]'.
"""


def _cli_parser():
    import argparse
    p = argparse.ArgumentParser(prog="cascade", description=_CLI_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cascade {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    mqtt = argparse.ArgumentParser(add_help=False)
    g = mqtt.add_argument_group("broker")
    g.add_argument("--host", default=os.environ.get("CASCADE_MQTT_HOST", "127.0.0.1"),
                   help="MQTT broker host (default: $CASCADE_MQTT_HOST or 127.0.0.1)")
    g.add_argument("--port", type=int, default=int(os.environ.get("CASCADE_MQTT_PORT", 0)) or None,
                   help="port (default: 1883, or 8883 with --tls)")
    g.add_argument("--username", default=os.environ.get("CASCADE_MQTT_USERNAME"))
    g.add_argument("--password", default=os.environ.get("CASCADE_MQTT_PASSWORD"))
    g.add_argument("--tls", action="store_true", help="connect with TLS (system CA store)")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    g.add_argument("--prefix", default=os.environ.get("CASCADE_TOPIC_PREFIX", _PREFIX),
                   help="topic prefix of the deployment, as given to its connectors "
                        "(default: $CASCADE_TOPIC_PREFIX or cascade)")
    ttl = argparse.ArgumentParser(add_help=False)
    ttl.add_argument("--ttl", type=float, help="seconds until the control lifts itself")

    def verb(name, help, parents=(mqtt,)):
        return sub.add_parser(name, help=help, description=help, parents=list(parents))
    scope_help = ("global, task:NAME (globs: task:fetch_*), tag:TAG, run:RUN_ID, "
                  "project:ID or key:NAME=VALUE (a task's key: key:customer=acme)")
    # A control verb: its arguments, and `publish`, the Controller call it makes.
    v = verb("pause", "stop new starts of tasks in SCOPE (running ones finish)", (mqtt, ttl))
    v.add_argument("scope", help=scope_help)
    v.set_defaults(publish=lambda ctl, a: ctl.pause(a.scope, ttl=a.ttl))
    v = verb("resume", "lift the pause of SCOPE; with --ramp, through a temporary rate "
                       "limit that lifts itself once the backlog has started")
    v.add_argument("scope", help=scope_help)
    v.add_argument("--ramp", metavar="RATE",
                   help="start the waiting tasks at this pace (10/s, 30/m, or per second), "
                        "not all at once; each engine lifts it once its backlog is through")
    v.add_argument("--ttl", type=float,
                   help="with --ramp: seconds the broker keeps the ramp at most (default: "
                        "from the engines' backlog, or an hour)")
    v = verb("drain", "for maintenance: runs already started finish; runs started later "
                      "hold at their first task in SCOPE until undrain", (mqtt, ttl))
    v.add_argument("scope", help=scope_help)
    v.set_defaults(publish=lambda ctl, a: ctl.drain(a.scope, ttl=a.ttl))
    v = verb("cancel", "cancel, once, the tasks in SCOPE that have not finished, on every "
                       "engine: they end skipped ('cancelled: SCOPE'), and what needs them "
                       "too; running async bodies are cancelled, sync ones finish and their "
                       "result is dropped. Not retained: later runs are not affected. "
                       "Prints how many tasks each engine cancelled; exits 1 if no engine "
                       "answered within --timeout")
    v.add_argument("scope", help=scope_help)
    v = verb("undrain", "lift the drain of SCOPE: the runs it held go on")
    v.add_argument("scope", help=scope_help)
    per = argparse.ArgumentParser(add_help=False)
    g = per.add_argument_group("per key (tasks declare keys: @cs.task(keys={'customer': ...}))")
    g.add_argument("--per", metavar="KEY", help="the control holds for each value of KEY on "
                                               "its own (beside a plain one of SCOPE)")
    g.add_argument("--override", action="append", default=[], metavar="VALUE=SETTING",
                   type=_value_setting, help="with --per: VALUE's own setting (acme=10, or "
                                             "acme=100/m for rate); repeat")
    shared = argparse.ArgumentParser(add_help=False)
    g = shared.add_argument_group("fleet-wide (engines with a coordinator: "
                                  "Engine(coordinator=cs.RedisCoordinator(...)))")
    g.add_argument("--shared", action="store_true", help="one budget for every engine of the "
                                                         "fleet, not one each")
    g.add_argument("--on-outage", choices=_OUTAGES, help="with --shared: while the "
                   "coordinator is unreachable, hold new starts or use this engine's share "
                   "(default: the coordinator's, hold)")
    v = verb("limit", "run at most N tasks of SCOPE at once (0 holds all)",
             (mqtt, ttl, per, shared))
    v.add_argument("scope", help=scope_help)
    v.add_argument("n", type=int, help="how many may run at once (0 holds every start)")
    v.add_argument("--fair", metavar="KEY", help="admit waiters round robin across the values "
                                                 "of KEY (one tenant's backlog does not hold "
                                                 "back another's)")
    v.add_argument("--weight", action="append", default=[], metavar="VALUE=W",
                   type=_value_setting, help="with --fair: VALUE gets W grants a round; repeat")
    v.set_defaults(publish=lambda ctl, a: ctl.limit(
        a.scope, a.n, per=a.per, overrides=_settings(a.override, int, "--override"),
        fair=a.fair, weights=_settings(a.weight, _number, "--weight"), ttl=a.ttl,
        shared=a.shared, on_outage=a.on_outage))
    v = verb("rate", "start at most RATE tasks of SCOPE (10/s, 30/m, 2/h, 500/d, or per "
                     "second); several RATEs are windows that each hold (60/m 10000/d)",
             (mqtt, ttl, per, shared))
    v.add_argument("scope", help=scope_help)
    v.add_argument("rate", nargs="+", help="10/s, 30/m, 2/h, 500/d, or a number per second; "
                                           "one per window")
    v.add_argument("--burst", type=int, nargs="+",
                   help="starts allowed at once, one per window (default 1; with several "
                        "windows 1 for the first, each other window's count for it)")
    v.add_argument("--unweighted", action="store_true",
                   help="each start takes 1 token, whatever its task's cost (requests, "
                        "beside a limit on tokens)")
    v.set_defaults(publish=lambda ctl, a: ctl.rate_limit(
        a.scope, a.rate[0] if len(a.rate) == 1 else a.rate,
        burst=a.burst[0] if a.burst and len(a.burst) == 1 and len(a.rate) == 1 else a.burst,
        weighted=not a.unweighted, per=a.per, overrides=_settings(a.override, str, "--override"),
        ttl=a.ttl, shared=a.shared, on_outage=a.on_outage))
    v = verb("adapt", "an adaptive limit on SCOPE: cut by --factor on each --on error or "
                      "body slower than --latency, one more after a clean window (AIMD)",
             (mqtt, ttl))
    v.add_argument("scope", help=scope_help)
    v.add_argument("--min", type=int, default=1, help="never below (default 1)")
    v.add_argument("--max", type=int, required=True, help="never above; where it starts")
    v.add_argument("--on", action="append", default=[], metavar="ERROR",
                   help="an exception class name that cuts it (ConnectionError); repeat")
    v.add_argument("--latency", type=float, help="seconds: a slower body cuts it too")
    v.add_argument("--factor", type=float, default=0.5, help="the cut (default 0.5)")
    v.set_defaults(publish=lambda ctl, a: ctl.adapt(
        a.scope, min=a.min, max=a.max, on=a.on, latency=a.latency, factor=a.factor,
        ttl=a.ttl))
    v = verb("clear", "remove the controls of SCOPE (all types, or --type)")
    v.add_argument("scope", help=scope_help)
    v.add_argument("--type", choices=[*_TYPES, *_TYPE_ALIASES],
                   help="one type only (limit = concurrency, rate = rate_limit)")
    v = verb("status", "list the controls in force on the broker, with time left, apart "
                       "the expired and rejected ones engines ignore, and the engines")
    v.add_argument("--engines", action="store_true",
                   help="also each engine's active runs and the controls it enforces")
    v.add_argument("--json", action="store_true",
                   help="print one JSON object: in_force, expired, rejected, engines")
    v = verb("watch", "print live task events of every run (Ctrl-C stops); each line: "
                      "time (UTC), project, source (host-pid), run, then the task and its "
                      "state, or the run's start or end and outcome")
    v.add_argument("--json", action="store_true", help="print raw JSON payloads")
    v.add_argument("--count", type=int, help="exit after this many events")
    for name, what in (("org", "only the runs of this org"),
                       ("project", "only the runs of this project"),
                       ("run", "only this run (its run id)")):
        v.add_argument(f"--{name}", type=_topic_level(f"--{name}"), help=what)
    v.add_argument("--topic", help="telemetry topic filter, instead of --org/--project/--run "
                                    "(default: PREFIX/telemetry/#)")
    verb("top", "a live view of the engines in the terminal: their runs with progress, "
                "rate and ETA, per-task counts, what waiting tasks wait on, the controls "
                "in force with time left and usage, finished runs; keys pause, resume, "
                "limit or clear the selected task (? lists them, q quits)")
    v = verb("serve", "a live web view of every engine on the broker: runs with progress, "
                      "rate and ETA, per-task counts, what blocked tasks wait on, controls "
                      "with time left and usage, finished runs; its buttons pause, resume, "
                      "limit or clear a task on every engine. Prints the URL to open, with "
                      "its token (Ctrl-C stops)")
    v.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS",
                   help="address the web view listens on (default 127.0.0.1, this machine "
                        "only; another is warned about: see the README's web view)")
    v.add_argument("--http-port", type=int, default=8765, metavar="N",
                   help="its port (default 8765; 0 picks a free one). --port is the broker's")
    v.add_argument("--token", default=os.environ.get("CASCADE_SERVE_TOKEN"),
                   help="the token every request for data or a control needs (default: "
                        "$CASCADE_SERVE_TOKEN, or a random one)")
    v = verb("demo", "run a demo workflow steered live (no broker needed)", ())
    v.add_argument("--tasks", type=int, default=40, help="items per stage (default 40)")
    v = verb("graph", "draw a workflow's graph (no broker needed): print it as DOT or "
                      "Mermaid, or write it (SVG laid out here, no Graphviz needed)", ())
    v.add_argument("flow", metavar="MODULE:ATTR",
                   help="where the workflow is: a lazy result, or a function taking no "
                        "arguments that returns one (pipeline:flow, pkg.jobs:build); the "
                        "current directory is searched first")
    v.add_argument("-o", "--output", metavar="PATH",
                   help="write it here, in the format of the extension (.svg, .dot, .mmd)")
    v.add_argument("--format", choices=["svg", "dot", "mermaid"],
                   help="default: the extension of --output, else dot")
    v.add_argument("--collapse", action=argparse.BooleanOptionalAction, default=None,
                   help="draw identical parallel calls as one box (default: for graphs of "
                        "more than 50 calls)")
    return p


class _CliError(Exception):
    """A CLI failure said in one line; ``status``: the exit status (2: bad input)."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def _topic_level(option):
    """An argparse type: a value that fills one topic level (a name, a run id)."""
    import argparse

    def check(value):
        if not value or any(c in value for c in "/+#\0"):
            raise argparse.ArgumentTypeError(f"{value!r}: {option} takes one name, without "
                                             "'/', '+' or '#'")
        return value
    return check


def _watch_topic(args):
    """The topic filter ``cascade watch`` subscribes to: --topic, or one built from
    --org/--project/--run (``+`` for those not given), or every run's telemetry."""
    parts = (args.org, args.project, args.run)
    if args.topic is not None:
        if any(parts):
            raise ValueError("--topic is a whole topic filter: give it or --org/--project/"
                             "--run, not both")
        return args.topic
    if not any(parts):
        return f"{args.prefix}/telemetry/#"
    return f"{args.prefix}/telemetry/" + "/".join(p or "+" for p in parts) + "/events"


def _mqtt_client(args):
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise _CliError("this verb talks to an MQTT broker and needs paho-mqtt: "
                        f"pip install '{_DIST}[mqtt]'") from None
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"cascade-cli-{os.getpid()}-{os.urandom(2).hex()}")
    if args.username:
        client.username_pw_set(args.username, args.password)
    if args.tls:
        client.tls_set()
    port = args.port or (8883 if args.tls else 1883)
    answer, answered = [], threading.Event()

    def on_connect(client, userdata, flags, reason, *rest):
        answer.append(reason)
        answered.set()
    client.on_connect = on_connect  # (the connector chains it)
    try:
        client.connect(args.host, port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise _CliError(f"cannot reach the MQTT broker at {args.host}:{port} ({exc}); "
                        "check --host/--port, or start one (e.g. mosquitto)") from None
    # Wait for the broker's answer (CONNACK) here, so that a refusal or a port that is
    # not a broker is said plainly (regression: both read "call client.connect(...)").
    client.loop_start()
    if not answered.wait(args.timeout):
        _loop_stop(client)
        raise _CliError(f"{args.host}:{port} took the connection but did not answer as an "
                        f"MQTT broker within {args.timeout:g}s; check --port (1883, or 8883 "
                        "with --tls) and --tls")
    reason = answer[0]
    if getattr(reason, "is_failure", bool(reason)):
        _loop_stop(client)
        text = str(getattr(reason, "getName", lambda: reason)())
        hint = ("not authorised: check --username/--password" if any(
            w in text.lower() for w in ("auth", "password", "user name")) else text)
        raise _CliError(f"the MQTT broker at {args.host}:{port} refused the connection: "
                        f"{hint}")
    return client


def _loop_stop(client):
    """paho's ``loop_stop()``, which raises AttributeError when its network thread ends
    by itself (after a disconnect or a refused connection) between its check of the
    thread and its join (seen on PyPy): the thread is gone either way."""
    try:
        client.loop_stop()
    except AttributeError:
        pass


def _value_setting(text):
    """``--override acme=10``: (value, setting as text)."""
    import argparse
    value, sep, setting = text.rpartition("=")
    if not sep or not value or not setting:
        raise argparse.ArgumentTypeError(f"{text!r}: use VALUE=SETTING (acme=10)")
    return value, setting


def _number(text):
    x = float(text)
    return int(x) if x.is_integer() and abs(x) < 1e15 else x


def _settings(pairs, kind, flag):
    """{value: setting} of repeated ``--override``/``--weight`` (None if none)."""
    if not pairs:
        return None
    out = {}
    for value, setting in pairs:
        try:
            out[value] = kind(setting)
        except ValueError:
            raise ConstraintError(f"{flag} {value}={setting}: {setting!r} is not "
                                  f"{'an int' if kind is int else 'a number'}") from None
    return out


async def _cli_verb(args, client):
    ctl = Controller(MqttConnector(client, timeout=args.timeout, prefix=args.prefix),
                     timeout=args.timeout)
    v = args.verb
    publish = getattr(args, "publish", None)
    if publish is not None:  # a control verb: pause, drain, limit, rate
        c = await publish(ctl, args)
        return f"{c.describe()}, held by the broker"
    if v == "resume":
        c = await ctl.resume(args.scope, ramp=args.ramp, ttl=args.ttl)
        return f"resumed {args.scope}" + ("" if c is None else f" through {c.describe()}")
    if v == "cancel":
        counts = await ctl.cancel(args.scope)
        if not counts:
            raise _CliError(f"no engine answered the cancel of {args.scope} within "
                            f"{args.timeout:g}s: none is running under prefix "
                            f"{args.prefix!r}, or they may not read {args.prefix}/commands/"
                            f"cancel or write {args.prefix}/acks/# (check the broker's ACL)")
        n = sum(counts.values())
        lines = [f"cancelled {n} task{'s' * (n != 1)} of {args.scope} on {len(counts)} "
                 f"engine{'s' * (len(counts) != 1)}"]
        lines += [f"  {_printable(e)}: {k}" for e, k in counts.items()]
        return "\n".join(lines)
    if v == "undrain":
        await ctl.undrain(args.scope)
        return f"undrained {args.scope}"
    if v == "clear":
        await ctl.clear(args.scope, args.type)
        return f"cleared {args.type or 'all controls'} on {args.scope}"
    if v == "status":
        found = await ctl.retained()
        engines = await ctl.engines()
        if args.json:
            return json.dumps(dict(_status_json(found), engines=engines))
        return _status_text(_status_sections(found) + _engine_sections(engines, args.engines))
    if v == "serve":
        return await _cli_serve(args, ctl)
    if v == "top":
        return await _cli_top(args, ctl)
    return await _cli_watch(args, ctl.connector)


async def _cli_serve(args, ctl):
    """``cascade serve``: the engines' presence records into a _View, served by a
    _WebView whose controls go through ``ctl``, until Ctrl-C."""
    view = _View()
    conn = await ctl._conn()
    await conn.subscribe(f"{args.prefix}/engines/#", view.feed)
    loop = asyncio.get_running_loop()

    def steer(verb, scope, n):  # on a request's thread: the controller lives on this loop
        fut = asyncio.run_coroutine_threadsafe(_steer(ctl, verb, scope, n), loop)
        try:
            return fut.result(3 * ctl.timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the broker did not confirm it within {3 * ctl.timeout:g}s")
    port = args.port or (8883 if args.tls else 1883)
    web = _WebView(view, steer, host=args.bind, port=args.http_port, token=args.token,
                   where="on every engine on the broker",
                   where_long=f"broker {args.host}:{port}, prefix {args.prefix}")
    print(f"cascade serve: open {web.url}\n(the token is after #token=; Ctrl-C stops)",
          flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        web.close()


async def _cli_top(args, ctl):
    """``cascade top``: the live view over the broker (curses), steering the selected
    task's scope through ``ctl``. Reads the engines' presence records
    (``<prefix>/engines/#``) into a _View; redraws on a new record, throttled to 10 a
    second, and every second (time left counts down); draws what _top_lines returns."""
    import curses
    view = _View()
    await ctl.connector.connect()
    await ctl.connector.subscribe(f"{args.prefix}/engines/#", view.feed)
    # the window's size from the terminal, at the start and after each resize, not from
    # $LINES/$COLUMNS (which some shells and tools export: curses would keep to them)
    sizes = {k: os.environ.pop(k) for k in ("LINES", "COLUMNS") if k in os.environ}
    try:
        screen = curses.initscr()
    except curses.error as exc:  # (TERM names no terminal curses knows)
        os.environ.update(sizes)
        raise _CliError(f"cascade top cannot draw on this terminal ({exc}); check $TERM, "
                        "or for a script read cascade status --engines --json") from None
    try:
        curses.noecho()
        curses.cbreak()
        screen.keypad(True)
        screen.nodelay(True)
        try:
            curses.curs_set(0)
        except curses.error:  # a terminal without an invisible cursor
            pass
        bold = curses.A_BOLD
        if curses.has_colors():
            curses.start_color()
            try:
                curses.use_default_colors()
                curses.init_pair(1, curses.COLOR_CYAN, -1)
                bold |= curses.color_pair(1)
            except curses.error:
                pass
        await _TopScreen(screen, curses, view, ctl, bold).run()
    finally:
        screen.keypad(False)
        curses.nocbreak()
        curses.echo()
        curses.endwin()
        os.environ.update(sizes)


class _TopScreen:
    """The curses side of ``cascade top``: keys, prompts and writing the lines."""

    def __init__(self, screen, curses, view, ctl, bold):
        self.screen, self.curses, self.view, self.ctl, self.bold = screen, curses, view, ctl, bold
        self.selected, self.help = 0, False
        self.mode, self.typed, self.pending = None, "", None  # a prompt in progress
        self.message, self.snap, self.resized = "", None, False

    async def run(self):
        drawn, version = 0.0, -1
        while True:
            dirty = False
            while True:
                key = self.screen.getch()
                if key == -1:
                    break
                dirty = True
                if not await self.key(key):
                    return
            now = time.monotonic()
            if dirty or now - drawn >= 1.0 or (self.view.version != version
                                               and now - drawn >= 0.1):
                version = self.view.version
                self.snap = self.view.snapshot()
                self.draw()
                drawn = now
            await asyncio.sleep(0.03)

    def scope(self):
        tasks = _top_tasks(self.snap) if self.snap else []
        return f"task:{tasks[self.selected][2]}" if tasks else None

    async def key(self, key):
        """Handle one key; False to quit."""
        c = self.curses
        if key == c.KEY_RESIZE:  # repaint it all: what the terminal kept is not ours
            self.resized = True
            return True
        if self.help:
            self.help = False
            return True
        if self.mode == "limit":
            if ord("0") <= key <= ord("9") and len(self.typed) < 9:
                self.typed += chr(key)
            elif key in (c.KEY_BACKSPACE, 127, 8):
                self.typed = self.typed[:-1]
            elif key in (10, 13, c.KEY_ENTER) and self.typed:
                self.mode, self.pending = "confirm", ("limit", self.pending[1], int(self.typed))
            elif key == 27:
                self.mode, self.message = None, "cancelled"
            return True
        if self.mode == "confirm":
            verb, scope, n = self.pending
            self.mode = None
            if key in (ord("y"), ord("Y")):
                self.message = f"{verb} {scope}..."
                self.draw()
                try:
                    self.message = await _steer(self.ctl, verb, scope, n)
                except (CascadeError, ValueError, OSError, asyncio.TimeoutError) as exc:
                    self.message = f"{verb} {scope} failed: {exc or type(exc).__name__}"
            else:
                self.message = "cancelled"
            return True
        if key in (ord("q"), ord("Q"), 3):
            return False
        tasks = _top_tasks(self.snap) if self.snap else []
        if key in (c.KEY_DOWN, ord("j")):
            self.selected = min(self.selected + 1, max(0, len(tasks) - 1))
        elif key in (c.KEY_UP, ord("k")):
            self.selected = max(0, self.selected - 1)
        elif key == ord("?"):
            self.help = True
        elif key in (ord("p"), ord("r"), ord("c"), ord("l")):
            scope = self.scope()
            if scope is None:
                self.message = "no task to steer: select one of a run's tasks first"
            elif key == ord("l"):
                self.mode, self.typed, self.pending = "limit", "", ("limit", scope, None)
            else:
                verb = {ord("p"): "pause", ord("r"): "resume", ord("c"): "clear"}[key]
                self.mode, self.pending = "confirm", (verb, scope, None)
        return True

    def bottom(self):
        if self.mode == "limit":
            return (f"limit {self.pending[1]} to how many at once? {self.typed}_  "
                    "(Enter, Esc cancels)")
        if self.mode == "confirm":
            verb, scope, n = self.pending
            return f"{verb} {scope}{'' if n is None else f' to {n}'} on the broker? y/n"
        return _printable(self.message)

    def draw(self):
        c, s = self.curses, self.screen
        h, w = s.getmaxyx()
        tasks = _top_tasks(self.snap)
        self.selected = max(0, min(self.selected, len(tasks) - 1))
        lines = _top_lines(self.snap, w, h, self.selected, self.bottom(), self.help)
        if self.resized:
            self.resized = False
            s.clear()
        else:
            s.erase()
        for y, line in enumerate(lines):
            attr = (c.A_REVERSE if line.startswith("  > ") or y == len(lines) - 1 and (
                self.mode or self.message) else self.bold if line[:1].isupper() or y == 0
                else c.A_NORMAL)
            try:  # (writing the bottom-right cell moves the cursor off the window)
                s.addstr(y, 0, line, attr)
            except c.error:
                pass
        s.refresh()


def _status_sections(found):
    """The sections of ``cascade status``, from ``Controller.retained()``: each
    ``(title, header, rows)``, the controls in force first (title None). (More sections
    can join: _status_text prints what it is given.)"""
    def constraint_row(c, when):
        return [c.type, c.scope, _printable(_CONTROL_TYPES[c.type].setting(c.params)), when]
    now = time.time()
    in_force = [constraint_row(c, "-" if c.expires_at is None else
                               f"{max(1, round(c.expires_at - now))}s")
                for c in found["in_force"]]
    expired = [constraint_row(c, f"{max(0, round(now - c.expires_at))}s ago")
               for c in found["expired"]]
    rejected = [[_printable(r["topic"]), _printable(r["reason"])] for r in found["rejected"]]
    return [
        (None, ["TYPE", "SCOPE", "SETTING", "TIME LEFT"], in_force),
        ("expired: every engine ignores them (cascade clear SCOPE removes them)",
         ["TYPE", "SCOPE", "SETTING", "EXPIRED"], expired),
        ("rejected: every engine ignores them, for the reason shown",
         ["TOPIC", "REASON"], rejected),
    ]


def _engine_sections(engines, detail):
    """The engines' sections of ``cascade status`` (see _status_sections), from
    ``Controller.engines()``: a table of them, and with ``detail`` one section each of
    its runs and the controls it enforces. Everything shown came off the wire."""
    def text(x):
        return "-" if x is None else _printable(x if isinstance(x, str) else json.dumps(
            x, default=repr))

    def counts(c):
        return ", ".join(f"{text(k)} {text(v)}" for k, v in sorted(c.items())) if isinstance(
            c, dict) else text(c)

    now, rows, sections = time.time(), [], []
    for e in engines:
        runs = e.get("runs") if isinstance(e.get("runs"), list) else []
        cons = e.get("constraints") if isinstance(e.get("constraints"), list) else []
        at = e.get("updated_at")
        ago = f"{max(0, round(now - at))}s ago" if _is_number(at) else "?"
        rows.append([text(e.get("engine_id")), f"{text(e.get('org'))}/{text(e.get('project'))}",
                     text(e.get("version")), str(len(runs)),
                     text(e.get("constraints_total", len(cons))),
                     f"lost (last heard {ago})" if e.get("lost") else f"up ({ago})"])
        if detail:
            lines = []
            for r in runs:
                r = r if isinstance(r, dict) else {}
                lines.append(["run", text(r.get("run_id")), counts(r.get("counts", {}))])
            for c in cons:
                c = c if isinstance(c, dict) else {}
                left = c.get("expires_in")
                setting = (_printable(_CONTROL_TYPES[c["type"]].setting(c.get("params") or {}))
                           if c.get("type") in _CONTROL_TYPES and isinstance(
                               c.get("params", {}), dict) else text(c.get("params")))
                lines.append([text(c.get("type")), text(c.get("scope")),
                              (f"{setting} ({text(c.get('origin'))}" + (
                                  f", {round(left)}s left" if _is_number(left) else "")
                               + ")").strip()])
            for c in e.get("shared") if isinstance(e.get("shared"), list) else ():
                c = c if isinstance(c, dict) else {}
                fleet = ", ".join(f"{k.replace('_', ' ')} {text(c[k])}" for k in (
                    "in_use", "credit", "fleet_in_use", "fleet_tokens", "engines",
                    "coordinator") if k in c)
                lines.append(["shared", f"{text(c.get('type'))} {text(c.get('scope'))}", fleet])
            sections.append((f"engine {text(e.get('engine_id'))} on {text(e.get('source'))}",
                             ["WHAT", "NAME", "STATE"], lines or [["-", "idle", "no run, no control"]]))
    title = "engines (a record not updated for 3 heartbeats is lost)"
    if detail and not rows:
        return [("no engine has a presence record on the broker", None, [])]
    return [(title, ["ENGINE", "ORG/PROJECT", "VERSION", "RUNS", "CONTROLS", "STATE"],
             rows)] + sections


def _status_text(sections):
    """``cascade status`` as text: a table per section (its title above it), sections
    without rows left out but the first, which says when nothing is in force."""
    parts = []
    for i, (title, header, rows) in enumerate(sections):
        if header is None:  # a line of its own
            parts.append([title])
            continue
        if not rows:
            if i == 0:
                parts.append(["no controls in force"])
            continue
        widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header) - 1)]
        lines = [] if title is None else [title]
        lines += ["  ".join([*(cell.ljust(w) for cell, w in zip(r, widths)), r[-1]]).rstrip()
                  for r in [header, *rows]]
        parts.append(lines)
    return "\n\n".join("\n".join(lines) for lines in parts)


def _status_json(found):
    """``cascade status --json``: Controller.retained() as one JSON object; each
    constraint as on the wire plus ``expires_in`` (seconds left, or null)."""
    def row(c):
        return dict(c.to_dict(), expires_in=c.expires_in())
    return {"in_force": [row(c) for c in found["in_force"]],
            "expired": [row(c) for c in found["expired"]],
            "rejected": [dict(r) for r in found["rejected"]]}


def _telemetry_events(p):
    """The events of a telemetry message: v1.1 carries a list, v1.0 one ``body``."""
    if not isinstance(p, dict):
        return None
    if isinstance(p.get("events"), list):
        return [e for e in p["events"] if isinstance(e, dict)]
    if isinstance(p.get("body"), dict):
        return [dict(p["body"], ts=p.get("ts", ""))]
    return None


def _clock_of(event):
    """HH:MM:SS.mmm (UTC) of a telemetry event, for ``cascade watch``."""
    at = event.get("at")
    if _is_number(at) and 0 <= at < 1e11:
        return _iso(at)[11:23]
    return str(event.get("ts", ""))[11:23]


async def _cli_watch(args, conn):
    await conn.connect()
    q = asyncio.Queue()
    topic = args.topic  # (main made it: _watch_topic)
    await conn.subscribe(topic, lambda t, p: q.put_nowait((t, p)))
    print(f"watching {topic} (Ctrl-C stops)", file=sys.stderr, flush=True)
    seen = 0  # events (a message carries one or more)
    while args.count is None or seen < args.count:
        topic, p = await q.get()
        if isinstance(p, bytes):  # over 64 KiB (an older engine's): handed on undecoded
            try:
                p = json.loads(p)
            except (ValueError, RecursionError):
                pass
        events = _telemetry_events(p)
        if args.json or events is None:
            print(json.dumps({"topic": topic, "payload": p}, default=repr), flush=True)
            seen += len(events) if events else 1
            continue
        for b in events:
            if args.count is not None and seen >= args.count:
                break
            seen += 1
            print(_watch_line(p, b), flush=True)
    return None


def _watch_line(p, b):
    """One telemetry event as a line for ``cascade watch``: time, project, source, run,
    then the task and its state, a map's counts, or the run's start or end (with its
    outcome, from 1.2).
    Whatever arrived, it never raises and never sends a control character to the
    terminal."""
    try:
        where = " ".join(_printable(p.get(k, "?")) for k in ("project_id", "source", "run_id"))
        if b.get("type") == "LifecycleEvent":
            status = b.get("status")
            return (f"{_clock_of(b)} {where} {_printable(b.get('event'))}"
                    + (f" {_printable(status)}" if status else ""))
        if b.get("type") == "MapCountsEvent":  # telemetry="counts"
            counts = " ".join(f"{_printable(k)} {int(n):,}" for k, n in b["counts"].items())
            return (f"{_clock_of(b)} {where} {_printable(b.get('task_id')):<24} "
                    f"{int(b['items']):,} items: {counts}")
        ms = b.get("duration_ms")
        extra = (f" {ms:.1f}ms" if _is_number(ms)
                 else "") + (f"  {_printable(b['error'])}" if b.get("error") else "")
        return (f"{_clock_of(b)} {where} {_printable(b.get('task_id')):<24} "
                f"{_printable(b.get('state')):<9}{extra}")
    except Exception:  # malformed: shown as data, not as a crash
        return _printable(json.dumps(b, default=repr))


def _load_flow(spec):
    """The workflow at ``module:attr`` (a lazy result, a list/tuple/dict of them, or a
    function of no arguments returning one), with the current directory first on the
    import path (as ``python -m`` has it). A mistake in ``spec`` raises _CliError with
    status 2 (as a bad argument); the user's code raising, status 1."""
    import importlib
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise _CliError(f"{spec!r}: give MODULE:ATTR, the module and the name of the "
                        "workflow in it (cascade graph pipeline:flow)", 2)
    if __name__ == "__main__":  # (python -m cascade, python cascade.py) the workflow's
        # `import cascade` must find this module, not load a second copy whose lazy
        # results this one would not know
        spec_ = globals().get("__spec__")
        own = spec_.name if spec_ is not None else os.path.splitext(os.path.basename(__file__))[0]
        if own not in sys.modules:  # (a module of this namespace's objects: runpy may
            alias = type(sys)(own)  # have run it in a namespace of no module's)
            alias.__dict__.update(globals())
            alias.__name__ = own
            sys.modules[own] = alias
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise _CliError(f"no module named {exc.name!r} (searched the current directory "
                            f"{here} and sys.path): run from the directory that holds it, or "
                            "give its dotted name (pkg.pipeline:flow)", 2) from None
        raise _CliError(f"importing {module} failed: {type(exc).__name__}: {exc}", 1) from None
    except Exception as exc:
        raise _CliError(f"importing {module} failed: {type(exc).__name__}: {exc}", 1) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = sorted(k for k, v in vars(obj).items() if isinstance(v, LazyResult)) \
                if hasattr(obj, "__dict__") else []
            hint = f"; lazy results there: {', '.join(names)}" if names else ""
            raise _CliError(f"{module} has no attribute {attr!r}{hint}", 2) from None
    if type(obj) is Task or type(obj) is _BoundTask:
        raise _CliError(f"{spec} is the task {obj.name!r} itself, not a workflow: name a lazy "
                        f"result ({obj.name}(...)) or a function that returns one", 2)
    if callable(obj) and not isinstance(obj, LazyResult):
        try:
            sig = inspect.signature(obj)
            sig.bind()
        except (TypeError, ValueError):
            raise _CliError(f"{spec} is a function that needs arguments; name a lazy result, "
                            "or a function taking none that returns one", 2) from None
        try:
            obj = obj()
        except Exception as exc:
            raise _CliError(f"{spec}() raised {type(exc).__name__}: {exc}", 1) from None
    if not isinstance(obj, LazyResult) and not (
            type(obj) in (list, tuple, dict) and obj and _scan(obj, [])):
        raise _CliError(f"{spec} is a {type(obj).__name__}, not a workflow: name a lazy "
                        "result (what calling a @cs.task function returns), a list of them, "
                        "or a function taking no arguments that returns one", 2)
    return obj


def _cli_graph(args):
    """``cascade graph MODULE:ATTR``: print DOT or Mermaid, or write a file."""
    fmt = args.format
    try:
        if args.output is not None and fmt is None:
            ext = os.path.splitext(args.output)[1].lower()
            fmt = _GRAPH_FORMATS.get(ext)
            if fmt is None:
                raise _CliError(f"--output {args.output}: cannot tell the format from "
                                f"{repr(ext) if ext else 'a path without an extension'}; end it "
                                "in .svg, .dot or .mmd, or give --format svg|dot|mermaid", 2)
        # what the module prints (at import, or building the graph) goes to stderr:
        # stdout is the drawing (cascade graph pipeline:flow > flow.dot)
        with contextlib.redirect_stdout(sys.stderr):
            drawing = _Drawing(_load_flow(args.flow), None, args.collapse)
            text = getattr(drawing, f"to_{fmt or 'dot'}")()
        if args.output is None:
            sys.stdout.write(text)
            return 0
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except _CliError as exc:
        print(f"cascade graph: {exc}", file=sys.stderr)
        return exc.status
    except (OSError, ValueError, TypeError) as exc:  # writing; too big to draw; a cycle
        print(f"cascade graph: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({fmt})", file=sys.stderr)
    return 0


def main(argv: Optional[list] = None) -> int:
    """The ``cascade`` command line; returns the exit status."""
    parser = _cli_parser()
    args = parser.parse_args(argv)
    if args.verb == "demo":
        return _demo(args.tasks)
    if args.verb == "graph":
        return _cli_graph(args)
    try:
        _check_prefix(args.prefix, "--prefix")
        if args.verb == "watch":
            args.topic = _watch_topic(args)
        if args.verb == "serve" and args.token is not None:
            _check_token(args.token, "--token")
        if args.verb == "serve" and not 0 <= args.http_port <= 65535:
            raise ValueError(f"--http-port {args.http_port}: need 0 to 65535 (0 picks a "
                             "free one)")
        if args.verb == "resume" and args.ttl is not None and args.ramp is None:
            raise ValueError("--ttl bounds the ramp of a resume: give --ramp RATE too")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        if args.verb == "top" and not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise _CliError("cascade top draws on a terminal, and this is not one; for a "
                            "script, read cascade status --engines --json")
        client = _mqtt_client(args)
        client.loop_start()
        try:
            out = asyncio.run(_cli_verb(args, client))
        finally:
            client.disconnect()
            _loop_stop(client)
    except KeyboardInterrupt:  # top's way out too: its screen is restored by then
        return 0 if args.verb == "top" else 130
    except (_CliError, CascadeError, OSError, asyncio.TimeoutError) as exc:
        print(f"cascade: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if out:
        print(out)
    return 0


# ===========================================================================
# Demo: python cascade.py demo
# ===========================================================================

def _demo(n=40):
    """A small ETL steered live: fan-out fetches, a map, a reduce, a retry that recovers,
    and the control plane at work while it runs."""
    import random
    rnd = random.Random(7)
    engine = Engine()
    out = sys.stderr
    attempts = collections.Counter()

    @task(name="fetch", tags=["io"])
    async def fetch(i):
        await asyncio.sleep(0.1 + rnd.random() * 0.05)
        return bytes(200 + 37 * i)

    @task(name="parse", tags=["cpu"])
    def parse(page):
        time.sleep(0.005)  # a sync body: it runs in the thread pool
        return len(page)

    @task(name="api_call", tags=["io"])
    async def api_call(size):
        await asyncio.sleep(0.04)
        return size // 10

    @task(name="notify")
    async def notify(k):
        return k

    @task(name="flaky")
    async def flaky():
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise ConnectionError("upstream hiccup")
        return "ok"

    @task(name="report")
    def report(sizes, scores, notes, status):
        return {"bytes": sum(sizes), "score": sum(scores), "notified": len(notes),
                "flaky": status}

    # per-item chains (fetch -> parse -> api_call): each api_call is ready as soon as its
    # own page is parsed, with no stage barrier; notify is a map; report reduces.
    sizes = [parse(fetch(i)) for i in range(n)]
    target = report(sizes, [api_call(s) for s in sizes], notify.map(range(12)),
                    flaky().with_retry(3, delay=0.2))

    starts = collections.defaultdict(list)
    running = collections.Counter()
    peak = collections.defaultdict(int)
    marks = {}
    t0 = time.perf_counter()

    def now():
        return time.perf_counter() - t0

    def on_event(e):
        if isinstance(e, TaskExecutionStarted):
            starts[e.task_name].append(now())
            running[e.task_name] += 1
            peak[e.task_name] = max(peak[e.task_name], running[e.task_name])
        elif isinstance(e, TaskExecutionFinished):
            running[e.task_name] -= 1
    engine.subscribe(Event, on_event)
    progress = _Progress(engine, stream=out)
    engine.subscribe(Event, progress)

    tty = getattr(out, "isatty", lambda: False)()

    def say(msg):
        out.write(f"{chr(13) + chr(27) + '[2K' if tty else ''}  {now():5.2f}s  {msg}\n")
        progress.draw()

    def steer():  # an operator, on another thread, while the run goes on
        time.sleep(0.35)
        marks["pause"] = now()
        engine.pause("task:api_call")
        say("engine.pause('task:api_call')       api calls wait; fetch and parse go on")
        time.sleep(0.2)
        st = engine.status()
        waits = collections.Counter(b["waits_on"].split(" (")[0] for b in st["blocked"])
        say("engine.status()   blocked: " + ", ".join(
            f"{n} on {w.replace(' on ', ' ')}" for w, n in waits.most_common()))
        time.sleep(0.2)
        marks["raise"] = now()
        engine.limit("task:fetch", 16)
        say("engine.limit('task:fetch', 16)      limit raised live from 4")
        time.sleep(0.6)
        marks["resume"] = now()
        engine.resume("task:api_call")
        say("engine.resume('task:api_call')      the waiting api calls start at once")

    out.write(f"Cascade {__version__} demo: {n} x (fetch -> parse -> api_call) -> report, plus "
              "a map of 12\nnotifications and a flaky call that recovers on retry.\n\n")
    engine.limit("task:fetch", 4)
    engine.rate_limit("task:notify", "10/s", burst=2)
    out.write("   0.00s  engine.limit('task:fetch', 4)      at most 4 fetches at once\n"
              "   0.00s  engine.rate_limit('task:notify', '10/s', burst=2)\n")
    steerer = threading.Thread(target=steer, daemon=True)
    steerer.start()
    handle = engine.start(target)
    result = handle.result()
    steerer.join()
    total = now()
    api = starts["api_call"]
    during = [t for t in api if marks["pause"] < t < marks["resume"]]
    notes = starts["notify"]
    span = (notes[-1] - notes[0]) if len(notes) > 1 else 0.0
    fetch_before = [t for t in starts["fetch"] if t < marks["raise"]]
    out.write(f"\nFinished in {total:.2f}s: {result}\n"
              f"  fetch     {len(fetch_before)} started under the limit of 4, "
              f"{len(starts['fetch']) - len(fetch_before)} after raising it to 16 "
              f"(peak {peak['fetch']} at once)\n"
              f"  api_call  {len(during)} started during the {marks['resume'] - marks['pause']:.1f}s "
              f"pause; {len(api)} in all\n"
              f"  notify    {len(notes)} starts spread over {span:.2f}s by the 10/s rate limit\n"
              f"  flaky     failed twice, succeeded on attempt {attempts['flaky']}\n"
              "\nNext: README.md; steer from a terminal with `cascade pause task:NAME` "
              f"(pip install '{_DIST}[mqtt]').\n")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
