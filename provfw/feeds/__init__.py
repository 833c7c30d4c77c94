"""Block lists from outside: their formats (``formats``); the feed fetcher will join them here."""
