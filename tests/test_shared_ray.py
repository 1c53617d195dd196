"""A shared Ray hands a run's client actors on to the next run only when they are idle, alive and
asked for with the same resources (fedlora.simulation.one_ray_for_every_run), with Ray stood in for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

from fedlora import simulation

ONE_CPU = {"num_cpus": 1, "num_gpus": 0.0}
pytestmark = pytest.mark.usefixtures("own_ray")  # the tests share (fake) Ray themselves, not the suite's


class FakeActor:
    """An actor handle: `__ray_ready__.remote()` answers with the actor itself."""

    def __init__(self, alive: bool = True) -> None:
        self.alive, self.terminated, self.killed = alive, False, False
        self.__ray_ready__ = SimpleNamespace(remote=lambda: self)
        self.terminate = SimpleNamespace(remote=self._terminate)

    def _terminate(self) -> None:
        self.terminated = True


class FakePool:
    """The parts of Flower's BasicActorPool the sharing reads."""

    def __init__(self, client_resources: dict, idle: int = 2, busy: int = 0, dead: int = 0) -> None:
        self.client_resources = client_resources
        self.pool = [FakeActor() for _ in range(idle - dead)] + [FakeActor(alive=False) for _ in range(dead)]
        self._future_to_actor = {object(): FakeActor() for _ in range(busy)}
        self.num_actors = idle + busy

    def terminate_all_actors(self) -> None:
        for actor in self.pool:
            actor.terminate.remote()

    def actors(self) -> list[FakeActor]:
        return [*self.pool, *self._future_to_actor.values()]


def fake_get(actors: list[FakeActor], timeout: float) -> list[FakeActor]:
    if not all(actor.alive for actor in actors):
        raise ray.exceptions.RayActorError()
    return actors


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[FakePool]:
    """Flower's own build stood in for: each call makes a FakePool of two idle actors, listed here."""
    pools: list[FakePool] = []

    def flower_build(backend, app_fn) -> None:
        backend.pool, backend.app_fn = FakePool(backend.client_resources), app_fn
        pools.append(backend.pool)

    monkeypatch.setattr(RayBackend, "build", flower_build)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get", fake_get)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "kill", lambda actor: setattr(actor, "killed", True))
    return pools


def a_run(resources: dict = ONE_CPU, leave: dict | None = None) -> SimpleNamespace:
    """One run's backend: built, then (after its rounds) terminated; `leave` sets how its pool ends."""
    backend = SimpleNamespace(client_resources=resources, pool=None, app_fn=None)
    RayBackend.build(backend, app_fn=lambda: "app")
    pool = backend.pool
    if leave:
        replaced = FakePool(resources, **leave)
        pool.pool, pool._future_to_actor, pool.num_actors = replaced.pool, replaced._future_to_actor, replaced.num_actors
    RayBackend.terminate(backend)
    return SimpleNamespace(pool=pool)


def test_idle_live_actors_serve_the_next_run_and_stop_with_the_sharing(built: list[FakePool]) -> None:
    with simulation.one_ray_for_every_run():
        first, second = a_run(), a_run()
        assert len(built) == 1 and second.pool is first.pool
        assert not any(actor.terminated for actor in first.pool.actors())
    assert all(actor.terminated for actor in first.pool.actors())  # Ray went down with the sharing
    assert RayBackend.build.__name__ == "flower_build"  # Flower's own methods are back


@pytest.mark.parametrize("leave", [{"idle": 1, "busy": 1}, {"idle": 2, "dead": 1}], ids=["a-client-still-busy", "a-dead-actor"])
def test_a_pool_with_work_in_flight_or_a_dead_actor_is_stopped_and_the_next_run_builds_its_own(
    built: list[FakePool], leave: dict
) -> None:
    with simulation.one_ray_for_every_run():
        first = a_run(leave=leave)
        assert all(a.terminated for a in first.pool.pool) and all(a.killed for a in first.pool._future_to_actor.values())
        second = a_run()
        assert len(built) == 2 and second.pool is not first.pool


def test_a_run_asking_for_other_resources_gets_fresh_actors_and_the_kept_ones_stop(built: list[FakePool]) -> None:
    with simulation.one_ray_for_every_run():
        first = a_run()
        second = a_run({"num_cpus": 0.5, "num_gpus": 0.0})
        assert len(built) == 2 and second.pool is not first.pool
        assert all(actor.terminated for actor in first.pool.actors())


def test_within_a_sharing_a_nested_one_leaves_everything_to_the_outer(built: list[FakePool]) -> None:
    with simulation.one_ray_for_every_run():
        first = a_run()
        with simulation.one_ray_for_every_run():  # a sweep started where Ray is shared already
            inner = a_run()
        assert inner.pool is first.pool and not any(actor.terminated for actor in first.pool.actors())
        assert a_run().pool is first.pool
