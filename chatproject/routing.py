"""WebSocket routes."""

from django.urls import path

from messaging.consumers import DeliveryConsumer

websocket_urlpatterns = [
    path("ws/", DeliveryConsumer.as_asgi()),
]
