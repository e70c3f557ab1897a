"""Plumbing shared by the page's parts: the session id, the error guard and the picture component."""

from __future__ import annotations

import functools
import inspect

import gradio as gr

from molcloak.pipeline.errors import MolcloakError


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _guard(fn):
    """Show molcloak errors in the page as a toast that starts with "molcloak:" (never a stack trace) and
    change nothing else; the `.then` that follows every step sets the cards and buttons back.

    Gradio 6.31 titles a toast by its type whatever `title` says, and a failed event marks every output
    with an "Error" badge: so the error is a warning toast whose text names molcloak, and the event ends
    normally with the page as it was."""

    def show(exc):
        gr.Warning(f"molcloak: {exc}", title="molcloak", duration=20)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except MolcloakError as exc:
                show(exc)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MolcloakError as exc:
            show(exc)
            return {}

    return wrapper


def picture(label: str, elem_id: str, height: int, visible: bool) -> gr.Image:
    """A read-only drawing (a PIL image: the molecule, an atom map), without the share/download buttons."""
    return gr.Image(
        label=label,
        type="pil",
        height=height,
        interactive=False,
        buttons=[],
        elem_id=elem_id,
        visible=visible,
        scale=2,
        min_width=240,
    )
