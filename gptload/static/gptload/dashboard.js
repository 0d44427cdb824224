// The dashboard's chart, and its figures kept live over a WebSocket.
(() => {
  const canvas = document.getElementById("hourly-chart");
  const chart = new Chart(canvas, {
    type: "bar",
    data: JSON.parse(canvas.dataset.chart),
    options: {
      maintainAspectRatio: false, animation: false,
      scales: { x: { stacked: true, ticks: { maxTicksLimit: 12 } }, y: { stacked: true, beginAtZero: true } },
      plugins: { legend: { position: "bottom" } },
    },
  });
  const root = document.getElementById("dashboard");
  const format = (value) => (typeof value === "number" ? value.toLocaleString() : value);
  const pick = (data, path) => path.split(".").reduce((o, k) => (o == null ? o : o[k]), data);
  const apply = (data) => {
    root.querySelectorAll("[data-live]").forEach((el) => {
      const value = pick(data, el.dataset.live);
      if (value !== undefined) el.textContent = format(value) + (el.dataset.suffix || "");
    });
    // The chart's last bar is the current hour: counted live.
    const last = chart.data.labels.length - 1;
    if (data.hour && last >= 0 && !new URLSearchParams(location.search).get("group")) {
      chart.data.datasets[0].data[last] = data.hour.ok;
      chart.data.datasets[1].data[last] = data.hour.failed;
      chart.update();
    }
    root.dataset.updated = Date.now();
  };
  let delay = 1000;
  const connect = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}${root.dataset.socket}`);
    socket.onmessage = (event) => { delay = 1000; apply(JSON.parse(event.data)); };
    socket.onclose = () => { setTimeout(connect, delay); delay = Math.min(delay * 2, 30000); };
  };
  connect();
})();
