// Same-origin API paths in the browser; Next.js forwards them to the gateway.
// BACKEND_URL: http://127.0.0.1:8000 in development, the gateway's URL in production.
const backend = process.env.BACKEND_URL ?? "http://127.0.0.1:8000";

export default {
  async rewrites() {
    return [
      { source: "/api/v1/:path*", destination: `${backend}/api/v1/:path*` },
      { source: "/api/v2/:path*", destination: `${backend}/api/v2/:path*` },
    ];
  },
};
