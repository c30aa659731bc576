"""The JSON API routes of the protocol."""

from django.urls import path, re_path

from messaging import server_api, views

urlpatterns = [
    path("clients/", views.clients_collection),
    path("clients/<str:client_id>/", views.client_detail),
    path("clients/<str:client_id>/close", views.client_close),
    path("clients/<str:client_id>/messages", views.client_messages),
    path("clients/<str:client_id>/ack", views.client_ack),
    path("messages/", views.messages_collection),
    path("rooms/", views.rooms_collection),
    path("rooms/<str:name>/join", views.room_join),
    path("rooms/<str:name>/leave", views.room_leave),
    path("rooms/<str:name>/messages", views.room_messages),
    path("direct/", views.direct_collection),
    path("direct/<str:name>/messages", views.direct_messages),
    path("notices/", views.notices),
    path("server/publish", server_api.publish),
    re_path(r"^.*$", views.not_found),
]
