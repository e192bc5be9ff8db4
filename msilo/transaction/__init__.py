"""Non-INVITE SIP transactions (RFC 3261 §17): server and client, timers, the clock."""

from msilo.transaction.client import ClientResult, ClientTransaction
from msilo.transaction.clock import Clock, DeadlineQueue, ManualClock, TimerValues
from msilo.transaction.layer import RequestHandler, TransactionLayer, TransactionStats
from msilo.transaction.server import ServerTransaction, State, server_key

__all__ = [
    "ClientResult",
    "ClientTransaction",
    "Clock",
    "DeadlineQueue",
    "ManualClock",
    "RequestHandler",
    "ServerTransaction",
    "State",
    "TimerValues",
    "TransactionLayer",
    "TransactionStats",
    "server_key",
]
