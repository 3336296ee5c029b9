"""Tests of the Admin service and ``kvstore admin``, against real daemon processes."""
