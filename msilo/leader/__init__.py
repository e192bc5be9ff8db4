"""The leader process's concerns: who is leader (``election``) and, later, what it runs."""

from msilo.leader.election import (
    FileLeaderElection,
    LeaderElection,
    MySQLLeaderElection,
    PostgresLeaderElection,
    advisory_lock_key,
    leader_election_for,
)

__all__ = [
    "FileLeaderElection",
    "LeaderElection",
    "MySQLLeaderElection",
    "PostgresLeaderElection",
    "advisory_lock_key",
    "leader_election_for",
]
