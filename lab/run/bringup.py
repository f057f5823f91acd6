"""One bring-up for every command that holds a lab: `run`/`compare`/`chaos` (the runner) and
`up` (its controller) make a lab the same way.

`prepare` checks the backend, makes the lab's data directory (before any record names it), the
cluster spec (written 0600: it carries the lab's fresh secret), the run-state record and the
backend object, and removes the data directory again if any of that fails. `held` brings the
backend up with its control endpoint and, whatever happens inside it (an error, Ctrl-C,
SIGTERM), closes the endpoint and takes the backend down: the nodes, the network, the data
directory and then the record, exactly what was created.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab.config.cluster import LOCAL_PORTS, build_cluster_spec
from lab.config.models import LabConfig
from lab.run.backends import (
    BACKENDS,
    Backend,
    BackendError,
    DataDir,
    LocalBackend,
    NetnsBackend,
    RunState,
    free_port_base,
    make_data_dir,
)
from lab.run.chaos import cluster_links
from lab.run.control import ControlServer
from lab.run.dashboard import Dashboard, LabInfo
from netem.kernel import require_net_admin
from scheduler.plugins import InstalledPolicies
from services.scheduler.state import policy_for
from services.spec import ClusterSpec

BackendFactory = Callable[["Prepared"], Backend]
"""Makes the backend of a prepared lab; `make_backend` for netns and local, the compose
driver passes its own (compose.stack.StackBackend over the stack's agents)."""


@dataclass
class Prepared:
    """A lab about to come up: what it is and where its record and logs go."""

    cfg: LabConfig
    spec: ClusterSpec
    spec_path: Path
    out_dir: Path
    data_dir: DataDir
    state: RunState
    allow_unemulated: bool = False

    @property
    def lab_id(self) -> str:
        return self.spec.lab_id


@dataclass
class HeldLab:
    """A lab that is up: its backend and its control endpoint."""

    prepared: Prepared
    backend: Backend
    control: ControlServer
    dashboard: Dashboard | None = None
    """The live dashboard, when one was asked for (`--dashboard`)."""


def check_backend(backend: str) -> None:
    """BackendError for an unknown backend; for netns, the privilege check before anything is
    written."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "netns":
        require_net_admin()


def make_backend(lab: Prepared) -> Backend:
    """The backend of a lab on this host: netns or local."""
    backend = lab.spec.backend
    logs = lab.out_dir / "logs"
    if backend == "local":
        return LocalBackend(lab.spec, lab.spec_path, logs, lab.state)
    if backend == "netns":
        return NetnsBackend(
            lab.spec,
            lab.spec_path,
            logs,
            lab.state,
            kv_min_fraction=lab.cfg.network.kv_min_fraction,
            allow_unemulated=lab.allow_unemulated,
        )
    raise BackendError(
        f"the {backend!r} backend has no lab on this host: a compose stack comes up with "
        "`docker compose up` (docs/compose.md)"
    )


def prepare(
    cfg: LabConfig,
    *,
    backend: str,
    out_dir: Path,
    lab_id: str | None = None,
    allow_unemulated: bool = False,
    before_backend: Callable[[ClusterSpec], None] | None = None,
) -> Prepared:
    """Data directory, spec, record for a new lab of `cfg` on `backend`. `before_backend`
    writes what else the lab needs from its spec (e.g. the runner's workload plan); if it or
    anything else here fails, the data directory is removed before the error goes on. The
    spec's policy is built once here, as the scheduler will build it, so that a policy plugin
    that cannot be used (scheduler.plugins.PolicyPluginError) stops the run before bring-up."""
    lab_id = lab_id or secrets.token_hex(3)
    base_port = free_port_base(LOCAL_PORTS) if backend == "local" else 0
    data_dir = make_data_dir(lab_id)
    try:
        spec = build_cluster_spec(
            cfg, lab_id=lab_id, backend=backend, data_dir=data_dir.path, base_port=base_port
        )
        policy_for(spec, InstalledPolicies())
        spec_path = (out_dir / "spec.json").resolve()
        spec.dump(spec_path)
        if before_backend is not None:
            before_backend(spec)
        state = RunState(lab_id, backend, spec_path, data_dir, secret=spec.secret)
    except BaseException:
        data_dir.remove()
        raise
    return Prepared(cfg, spec, spec_path, out_dir, data_dir, state, allow_unemulated)


def lab_info(lab: Prepared, rates_mbit: Mapping[str, Mapping[str, float]]) -> LabInfo:
    """What the dashboard shows about `lab` and offers in its controls."""
    return LabInfo(
        lab_id=lab.lab_id,
        backend=lab.spec.backend,
        policy=lab.cfg.policy.value,
        time_dilation=float(lab.cfg.scaling.time_dilation),
        nodes=[n.node_id for n in lab.spec.nodes],
        links={node: sorted(nics) for node, nics in sorted(rates_mbit.items())},
    )


@contextmanager
def held(
    lab: Prepared,
    factory: BackendFactory = make_backend,
    *,
    controller_pid: int | None = None,
    on_down: Callable[[list[str]], None] | None = None,
    dashboard_port: int | None = None,
) -> Iterator[HeldLab]:
    """The lab up, with its control endpoint recorded (and `controller_pid`, the process that
    owns a lab of `dualpath up`), and its live dashboard on `dashboard_port` (0: any free port)
    when one is asked for; down again on the way out, `on_down` told what was removed."""
    try:
        be = factory(lab)
    except BaseException:
        lab.data_dir.remove()
        raise
    control: ControlServer | None = None
    dashboard: Dashboard | None = None
    try:
        links = cluster_links(lab.cfg)
        if dashboard_port is not None:  # before the lab: a port that is taken stops nothing up
            dashboard = Dashboard(
                lab_info(lab, links.rates_mbit),
                control_url="http://127.0.0.1:0",  # the control endpoint's, once it is up
                secret=lab.spec.secret,
                port=dashboard_port,
            )
        be.up()
        control = ControlServer(be, links, secret=lab.spec.secret)
        lab.state.data["control_url"] = control.url
        if dashboard is not None:
            dashboard.control_url = control.url
            lab.state.data["dashboard_url"] = dashboard.address
        if controller_pid is not None:
            lab.state.data["controller_pid"] = controller_pid
        lab.state.save()
        yield HeldLab(lab, be, control, dashboard)
    finally:
        if dashboard is not None:
            dashboard.close()
        if control is not None:
            control.close()
        removed = be.down()
        if on_down is not None:
            on_down(removed)
