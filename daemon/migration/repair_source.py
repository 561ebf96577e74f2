"""Where a ferryd gets its repair helper (ferry-repair) from, and again after it went away."""

from __future__ import annotations

import trio

from ferryd.migration.repair_client import RepairClient, RepairListener, RepairUnavailable


class RepairSource:
    """Where this ferryd gets its repair helper from (--repair-socket/--repair-listen)."""

    def __init__(self, connect: str | None, listen: str | None) -> None:
        self.connect_path = connect
        self.listen_path = listen
        self._listener: RepairListener | None = None
        self._client: RepairClient | None = None
        self._getting = trio.Lock()
        """One connection at a time: a target reaches the helper early, in the background,
        while its restore may ask for it too (TargetMigration._reach_helper)."""

    async def setup(self) -> None:
        if self.listen_path:
            self._listener = await RepairListener.bind(self.listen_path)

    def close(self) -> None:
        """Stop listening for the helper; its socket file is removed while still ours.

        The helper's connection, if any, is left to the process's exit.
        """
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def get(self) -> RepairClient:
        if self._client is not None and not self._client.closed:
            return self._client
        async with self._getting:
            return await self._get()

    async def _get(self) -> RepairClient:
        if self._client is not None and not self._client.closed:
            return self._client  # reached meanwhile, by the call this one waited for
        if self.connect_path:
            self._client = await RepairClient.connect(self.connect_path)
        elif self._listener is not None:
            with trio.move_on_after(10) as scope:
                self._client = await self._listener.accept()
            if scope.cancelled_caught:
                raise RepairUnavailable(
                    f"no repair helper connected to {self.listen_path} within 10 s"
                )
        else:
            raise RepairUnavailable(
                "migrating TCP connections needs the repair helper: start ferryd with "
                "--repair-socket PATH (ferry-repair --listen PATH) or --repair-listen PATH"
            )
        assert self._client is not None
        return self._client
