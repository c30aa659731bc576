"""URL configuration: the admin, Django's login pages, the JSON API and the home page."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from messaging import metrics, overview, views

urlpatterns = [
    path("admin/overview/", admin.site.admin_view(overview.overview_view), name="admin-overview"),
    path("admin/", admin.site.urls),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(
            template_name="admin/login.html",
            extra_context={"site_header": "Tab relay", "title": "Log in"},
        ),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/", include("messaging.urls")),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("", views.home, name="home"),
]

handler400 = "messaging.views.bad_request"
handler404 = "messaging.views.not_found"
handler500 = "messaging.views.server_error"
