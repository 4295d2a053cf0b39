"""Discovery: mDNS records, the advertiser, the zeroconf publisher."""
