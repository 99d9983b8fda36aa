"""Example vendor plugin for lmcache."""
