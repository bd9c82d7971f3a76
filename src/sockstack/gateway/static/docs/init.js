// The docs page of a sockstack HTTP gateway: Swagger UI on this server's /openapi.json, both
// served by the server itself (no CDN, no validator badge: nothing is fetched from elsewhere).
// A server with a secret: open the page as /docs/?access_token=SECRET, and every request the
// page makes carries "Authorization: Bearer SECRET" (or use the page's Authorize button).
(function () {
  "use strict";
  var token = new URLSearchParams(window.location.search).get("access_token");
  var spec = new URL("../openapi.json", window.location.href).href;
  window.ui = SwaggerUIBundle({
    url: spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    requestInterceptor: function (req) {
      if (token && !req.headers.Authorization) {
        req.headers.Authorization = "Bearer " + token;
      }
      return req;
    },
  });
})();
