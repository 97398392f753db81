"""The BGP speaker: ExaBGP supervised as a child, learned routes with graceful restart, import filters.

Modules (pure unless marked):
- `exabgp_config`: `Neighbor` (one BGP neighbor), `render(neighbors, socket) -> str`, `render_timers(neighbors)`,
  `environment(run_dir)`,
  `validate(neighbors)` raising `NeighborError` (one `neighbor 'NAME': field: reason` line per problem).
- `events`: what the speaker reports: `PeerUp`, `PeerDown`, `RoutesAnnounced`, `RoutesWithdrawn`, `EndOfRib`,
  `SpeakerRestarted` (`BgpEvent` is their union).
- `messages`: ExaBGP 5 JSON line -> typed message; `sessions`: messages -> events + per-neighbor status.
- `announce`: `Announcement` and `diff_commands(old, new, addresses)` -> bulk ExaBGP commands.
- `rib`: `Rib` — learned routes per peer with graceful restart; `apply(event, now)`, `expire(now)`,
  `next_deadline()`, `routes()`, `counts()`, `forget(peer)`.
- `policy`: `MeshImportPolicy`, `ExternalImportPolicy` (`filter(prefixes) -> (accepted, rejections)`),
  `RejectionLog`.
- `speaker` (asyncio, I/O): `Speaker(run_dir, on_event, exabgp=None, env=None)` with `start()`, `stop()`,
  `set_neighbors(list[Neighbor])`, `set_announcements(dict[prefix, Announcement])`, `status()`.
- `exabgp_launch` (process): `python -m bgp.exabgp_launch --timers FILE --api-socket SOCKET CONFIG`, how the
  speaker runs ExaBGP: with `exabgp_reactor` (event-driven waits instead of a 10 ms poll, connectRetry,
  keepalive) and `exabgp_api` (its API on the speaker's socket directly) installed.
- `relay` (process): `python -m bgp.relay SOCKET`, the helper a plain ExaBGP (`paths.exabgp`) runs.
- `attributes`: `PathAttributes` (ExaBGP JSON in, ExaBGP command words out); `reflect`: route reflection
  (`Reflector`, `Path`, `reflect()`, `looped()`), pure.
- `cli_probe` (process): a Speaker driven by JSON lines, and `ProbeClient` to drive it from tests and labs.
"""
