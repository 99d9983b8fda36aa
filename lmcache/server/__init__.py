"""MP mode: ``lmcache server`` owns the pool and its tiers; engines connect over ZeroMQ and share memory."""
