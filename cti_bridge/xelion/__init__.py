"""The Xelion side of cti-bridge: the REST session (``rest``), the admin API's checks
(``directory``) and the notification websocket source (``source``); see xelion-protocol.md."""
