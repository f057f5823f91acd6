"""The compose backend's side of the Docker SDK: what the engine answers becomes the lab's
error naming the object and the cause, the label filters select only the lab's (and its
project's) objects, and leftovers are removed by id, one failure not stopping the rest.
(The SDK against a real engine: tests/e2e.)"""

from __future__ import annotations

from pathlib import Path

import docker.errors
import pytest
import requests

from compose import backend, engine
from compose.render import LAB_LABEL
from dualpath.errors import EXIT_FAILED, DualPathError
from lab.run.backends import BackendError


def _response(status: int) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    return response


def test_a_missing_container_is_named_with_the_engines_words() -> None:
    exc = docker.errors.NotFound(
        "404 Client Error", response=_response(404), explanation="No such container: 3f2a9c"
    )
    err = engine.describe_engine_error("container prefill-0 (3f2a9c)", exc)
    assert isinstance(err, BackendError) and isinstance(err, DualPathError)
    assert err.exit_status == EXIT_FAILED
    assert str(err) == (
        "container prefill-0 (3f2a9c): the Docker engine has no such object "
        "(No such container: 3f2a9c)"
    )


def test_a_refusal_carries_its_http_status_and_explanation() -> None:
    exc = docker.errors.APIError(
        "409 Client Error",
        response=_response(409),
        explanation=b"network abc has active endpoints",
    )
    err = engine.describe_engine_error("network abc", exc)
    assert str(err) == (
        "network abc: the Docker engine refused (HTTP 409): network abc has active endpoints"
    )


def test_a_refusal_without_explanation_keeps_the_sdks_message() -> None:
    err = engine.describe_engine_error("volume v1", docker.errors.APIError("engine said no"))
    assert str(err) == "volume v1: the Docker engine refused: engine said no"


@pytest.mark.parametrize(
    "exc",
    [
        docker.errors.DockerException("Error while fetching server API version: refused"),
        requests.exceptions.ConnectionError("Connection aborted"),  # an OSError
    ],
)
def test_no_engine_says_so_and_how_to_start_one(exc: Exception) -> None:
    err = engine.describe_engine_error("container driver (abc)", exc)
    text = str(err)
    assert text.startswith("container driver (abc): no Docker engine answers (")
    assert str(exc) in text
    assert "compose/ensure-docker.sh" in text


def test_engine_errors_wraps_and_chains_only_the_sdks_errors() -> None:
    cause = docker.errors.NotFound("gone", explanation="No such image: x:1")
    wrapped = pytest.raises(engine.EngineError, match=r"^image x:1: .*No such image: x:1")
    with wrapped as info, engine.engine_errors("image x:1"):
        raise cause
    assert info.value.__cause__ is cause
    with pytest.raises(KeyError), engine.engine_errors("image x:1"):
        raise KeyError("not the engine's")


def test_an_unreachable_engine_is_an_engine_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real SDK against a socket nobody listens on."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    engine.client.cache_clear()
    try:
        with pytest.raises(engine.EngineError, match="no Docker engine answers") as info:
            backend.leftovers("ab12cd")
        assert str(info.value).startswith("the Docker engine: ")
    finally:
        engine.client.cache_clear()


def test_label_filters_require_every_label() -> None:
    labels = backend.lab_labels("ab12cd", "dualpath-ab12cd")
    assert engine.label_filters(labels) == {
        "label": [f"{LAB_LABEL}=ab12cd", "com.docker.compose.project=dualpath-ab12cd"]
    }
    assert engine.label_filters(backend.lab_labels("ab12cd")) == {"label": [f"{LAB_LABEL}=ab12cd"]}
    with pytest.raises(ValueError, match="match everything"):
        engine.label_filters({})


def test_leftovers_are_removed_by_id_and_one_failure_does_not_stop_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[str, dict[str, str]]] = []
    found = {"container": ["c1", "c2"], "network": ["n1"], "volume": ["v1"]}

    def ids(kind: engine.Kind, labels: dict[str, str]) -> list[str]:
        asked.append((kind, dict(labels)))
        return found[kind]

    removed: list[str] = []

    def remove(kind: engine.Kind, ident: str) -> None:
        if ident == "c1":
            raise engine.EngineError("container c1: the Docker engine refused (HTTP 409): busy")
        removed.append(ident)

    monkeypatch.setattr(engine, "ids", ids)
    monkeypatch.setattr(engine, "remove", remove)
    done = backend.remove_leftovers("ab12cd", "dualpath-ab12cd")
    assert removed == ["c2", "n1", "v1"]
    assert done == ["container c2", "network n1", "volume v1"]
    both = {LAB_LABEL: "ab12cd", "com.docker.compose.project": "dualpath-ab12cd"}
    assert asked == [("container", both), ("network", both), ("volume", both)]


def test_exec_into_a_node_the_stack_does_not_have_names_the_ones_it_has() -> None:
    record = {"lab_id": "ab12cd", "compose": {"containers": {"driver": "c1", "decode-0": "c2"}}}
    with pytest.raises(
        engine.ComposeError, match=r"no node 'prefill-7' \(have: \['decode-0', 'driver'\]\)"
    ):
        backend.exec_in(record, "prefill-7", ["true"])
